"""SimPO: reference-free preference loss on length-averaged log-probabilities.

Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
(arXiv:2405.14734). The implicit reward is the average log-probability of a completion's tokens, scaled by
beta, and the chosen reward must beat the rejected one by a target margin gamma:

    z = beta * (avg_c - avg_r) - gamma
    loss = -(1 - eps) log sigma(z) - eps log sigma(-z)      (eps = label smoothing, 0 in the paper)

avg = summed log-prob of the completion's tokens / their number (`sequence_logps` gives both). gamma is the
margin itself, as in the paper; TRL's `simpo_gamma` is gamma / beta. With avg_c = avg_r the loss is
-log sigma(-gamma) = log(1 + e^gamma). Losses are per pair (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_losses(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss and the rewards.

    Args:
        chosen_avg_logps, rejected_avg_logps: (B,) length-averaged policy log-probabilities.
        beta: reward scale, > 0 (the paper uses 2 to 10).
        gamma: target reward margin, >= 0 (the paper uses 0.3 to 1.6; often set as a fraction of beta).
        label_smoothing: assumed rate of flipped labels, in [0, 0.5).
    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are beta * avg, detached.
    """
    if beta <= 0:
        raise ValueError(f"SimPO beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"SimPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()
