"""PPO for language models: advantages, clipped policy and value losses, KL penalties and KL controllers.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); GAE from Schulman et al.
2016 (arXiv:1506.02438); the per-token KL penalty and the adaptive KL coefficient from Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593).

Every tensor is per token, (B, T), with a (B, T) mask of the response tokens (1 where the policy acted).
For a response's tokens t (mask 1, in order; masked positions are skipped, not treated as episode ends):

    delta_t = r_t + gamma V_{t+1} - V_t            (V after the last token is 0: the episode ends)
    A_t     = delta_t + gamma lambda A_{t+1}        returns R_t = A_t + V_t
    rho_t   = exp(log pi(a_t) - log pi_old(a_t))
    policy  = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
    value   = 1/2 max((V_t - R_t)^2, (clip(V_t, V_old - eps_v, V_old + eps_v) - R_t)^2)

Losses and metrics come back per token, zero where the mask is 0; reduce them with the mask (the loop sums
and divides by the window's count of response tokens). Per-token rewards usually hold -kl_coef * KL_t at
every token plus the sequence score on the last one (`shaped_rewards`). The entropy bonus uses
`tokens.token_entropy` (chunked like the log-probs): loss -= entropy_coef * entropy, per token.
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, computed backwards over each row's masked tokens.

    Args:
        rewards, values: (B, T) per-token rewards and value estimates.
        mask: (B, T), 1 on the response tokens; other positions are skipped.
        gamma: discount; lam: GAE lambda.
    Returns:
        (advantages (B, T), returns (B, T)), 0 where mask is 0, detached.
    """
    rewards, values, valid = rewards.detach(), values.detach(), mask.bool()
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])  # (B,) value of the next valid token, 0 after the last
    next_adv = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid[:, t], adv, 0.0)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv, next_adv)
    return advantages, torch.where(valid, advantages + values, 0.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of x (B, T) (mean kept if not shift_mean); 0 off the mask."""
    valid = mask.bool()
    mean = x[valid].mean()
    std = x[valid].std(unbiased=False)
    out = (x - mean) / (std + eps) + (0.0 if shift_mean else mean)
    return torch.where(valid, out, 0.0)


def clipped_policy_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token.

    Args:
        logps: (B, T) log-probs of the sampled tokens under the policy being trained.
        old_logps: (B, T) the same under the policy that sampled them (no grad).
        advantages: (B, T), or (B, 1) / (B,) broadcast over tokens (GRPO's per-sequence advantages).
        mask: (B, T), 1 on response tokens.
        clip_eps: lower clip range eps_low (ratio >= 1 - eps_low).
        clip_eps_high: upper clip range (ratio <= 1 + eps_high); None means clip_eps. DAPO's "clip-higher"
            (Yu et al. 2025, arXiv:2503.14476) sets it above clip_eps.
    Returns:
        (losses (B, T); clipped (B, T) float, 1 where the clipped term is the larger one and so carries no
        gradient; approx_kl (B, T) = (rho - 1) - log rho, an estimate of KL(old || new)); metrics detached,
        everything 0 off the mask.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    valid = mask.bool()
    log_ratio = torch.where(valid, logps - old_logps.detach(), 0.0)  # 0 off the mask: no overflow there
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + high)
    losses = torch.where(valid, torch.maximum(unclipped, clipped), 0.0)
    was_clipped = (valid & (clipped > unclipped)).float().detach()
    approx_kl = torch.where(valid, (ratio - 1) - log_ratio, 0.0).detach()
    return losses, was_clipped, approx_kl


def clipped_value_losses(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, per token.

    Args:
        values: (B, T) value head outputs being trained; old_values: (B, T) at rollout time; returns: (B, T).
        mask: (B, T), 1 on response tokens.
        clip_eps: how far a value may move from old_values before its gradient stops.
    Returns:
        (losses (B, T), clipped (B, T) float: 1 where the clipped error is the larger one, detached); 0 off the mask.
    """
    old_values, returns, valid = old_values.detach(), returns.detach(), mask.bool()
    unclipped = (values - returns) ** 2
    clipped = (torch.clamp(values, old_values - clip_eps, old_values + clip_eps) - returns) ** 2
    losses = torch.where(valid, 0.5 * torch.maximum(unclipped, clipped), 0.0)
    return losses, (valid & (clipped > unclipped)).float().detach()


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html).

    k1 = log pi - log ref (unbiased, can be negative); k3 = e^{log ref - log pi} - (log ref - log pi) - 1
    (unbiased, always >= 0, lower variance). Args: (B, T) log-probs of the sampled tokens. Returns (B, T).
    """
    log_ratio = logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k3")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl at every response token, plus each sequence's score on its last one.

    Args:
        scores: (B,) sequence-level rewards; kl: (B, T) per-token KL estimates; mask: (B, T).
    Returns:
        (B, T), 0 off the mask, detached.
    """
    valid = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, -1).max(dim=1).values  # (B,) index of the last response token
    rewards = torch.where(valid, -kl_coef * kl.detach(), 0.0)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores.detach().to(rewards.dtype)[has_tokens]
    return rewards


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, num_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019's proportional controller driving the observed KL towards `target`.

    error = clip(current_kl / target - 1, -0.2, 0.2);  value *= 1 + error * num_steps / horizon
    where num_steps is how many samples (or steps, consistently with horizon) the KL was measured over.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, num_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * num_steps / self.horizon
