"""KTO: alignment from unpaired examples, each marked desirable or undesirable.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv:2402.01306).
With the log-ratio r = log pi(y|x) - log ref(y|x) of an example and a reference point z0,

    desirable:    loss = w_d * (1 - sigma(beta * (r - z0)))
    undesirable:  loss = w_u * (1 - sigma(beta * (z0 - r)))

z0 estimates KL(pi || ref): the mean log-ratio of completions paired with prompts they were not written for
(the caller builds those mismatched pairs, e.g. completion i+1 with prompt i), clamped at 0 and detached,
so no gradient flows through it. z0 is in log-ratio units and is scaled by beta with r, as in the paper and
TRL. The paper suggests weights with w_d * n_desirable / (w_u * n_undesirable) in [1, 4/3].

Losses are per example (B,). z0 is a batch statistic: computed per micro-batch it differs (slightly) between
one large batch and its accumulated parts; for exact accumulation compute it once over the whole window
(sum the mismatched log-ratios and their count across micro-batches and processes, then clamp).
"""

from __future__ import annotations

import torch


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(policy - reference log-probs)) over mismatched (prompt, completion) pairs, detached.

    Args:
        policy_kl_logps, ref_kl_logps: (M,) summed log-probabilities of the mismatched completions.
    Returns:
        0-dim float tensor.
    """
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


def kto_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO loss and the rewards.

    Args:
        policy_logps, ref_logps: (B,) summed log-probabilities of each example's completion.
        desirable: (B,) bool, True for desirable examples.
        reference_point: 0-dim z0, from `kto_reference_point` (detached).
        beta: reward scale, > 0.
        desirable_weight, undesirable_weight: w_d and w_u.
    Returns:
        (losses (B,), rewards (B,) = beta * log-ratio, detached).
    """
    if beta <= 0:
        raise ValueError(f"KTO beta must be > 0, got {beta}")
    logratio = policy_logps - ref_logps  # (B,)
    z0 = reference_point.detach()
    gain = torch.where(desirable, torch.sigmoid(beta * (logratio - z0)), torch.sigmoid(beta * (z0 - logratio)))
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logratio.dtype)
    return weight * (1 - gain), beta * logratio.detach()
