"""GRPO: PPO's clipped objective with group-relative advantages instead of a value model.

Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), section 4.1. Each prompt gets G sampled completions with
scalar rewards r_1..r_G; every token of completion i gets the advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)      (or r_i - mean(r) when not scaling by std, as Dr. GRPO,
                                                 Liu et al. 2025, arXiv:2503.20783, recommends)

std is the sample standard deviation (Bessel-corrected, as TRL computes it). A group whose rewards are all
equal has nothing to learn from and gets exactly 0 (not a rounding residue of r - mean(r)).

The per-token loss is PPO's clipped surrogate (`ppo.clipped_policy_losses`) plus beta * k3 KL to a reference
policy. How tokens are reduced, chosen by `normalisation`:

    "sequence"  each sequence's token-mean, one loss unit per sequence (the GRPO paper): short and long
                completions weigh the same, so a long one's tokens each count less.
    "token"     the token sum, one loss unit per token (DAPO, Yu et al. 2025, arXiv:2503.14476): every token
                weighs the same, whatever its sequence's length.

The loop sums the (B,) losses and divides by the summed (B,) units over the window, so both are exact under
accumulation.
"""

from __future__ import annotations

import torch

from tunesmith.objectives.ppo import clipped_policy_losses, kl_penalty

NORMALISATIONS = ("sequence", "token")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: (N * G,) rewards, the G completions of each prompt adjacent.
        group_size: G, >= 2.
        scale_by_std: divide by the group's std (+ eps).
    Returns:
        (N * G,) advantages, detached; exactly 0 for a group of equal rewards.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the {rewards.numel()} rewards, got {group_size}")
    grouped = rewards.detach().view(-1, group_size)  # (N, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(constant, 0.0, centred).view(-1)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, normalisation: str) -> torch.Tensor:
    """(B, T) -> (B,): token sum, or token mean for "sequence" (0 for a sequence without tokens)."""
    total = torch.where(mask.bool(), per_token, 0.0).sum(-1)
    return total if normalisation == "token" else total / mask.sum(-1).clamp(min=1)


def grpo_losses(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    normalisation: str = "sequence",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sequence GRPO losses, their loss units, and metrics reduced the same way.

    Args:
        logps: (B, T) log-probs of the sampled tokens under the policy being trained.
        advantages: (B,) from `group_advantages`.
        mask: (B, T), 1 on completion tokens.
        old_logps: (B, T) under the sampling policy; None for a single update per batch (ratio 1, the
            gradient is then that of the plain policy gradient A * log pi).
        ref_logps: (B, T) under the reference policy; required when beta > 0.
        beta: weight of the per-token k3 KL to the reference.
        clip_eps, clip_eps_high: the clip range, as in `ppo.clipped_policy_losses`.
        normalisation: "sequence" or "token" (see the module docstring).
    Returns:
        (losses (B,), units (B,) float: 1 per sequence with tokens or its token count,
        metrics {"clip_fraction", "approx_kl"[, "kl"]}: 0-dim sums reduced like the loss, detached, so that
        dividing by the units gives means).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown GRPO normalisation {normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    if beta > 0 and ref_logps is None:
        raise ValueError("GRPO with beta > 0 needs ref_logps (or set beta = 0 to drop the KL term)")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    per_token, clipped, approx_kl = clipped_policy_losses(logps, old, advantages, mask, clip_eps, clip_eps_high)
    metrics = {"clip_fraction": clipped, "approx_kl": approx_kl}
    if beta > 0:
        kl = kl_penalty(logps, ref_logps, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = kl.detach()
    num_tokens = mask.sum(-1)
    units = num_tokens if normalisation == "token" else (num_tokens > 0).to(logps.dtype)
    summed = {name: _reduce(value, mask, normalisation).sum() for name, value in metrics.items()}
    return _reduce(per_token, mask, normalisation), units, summed
