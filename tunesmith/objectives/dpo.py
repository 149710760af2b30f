"""Direct preference losses on sequence log-probabilities: DPO and its sigmoid, robust, IPO and hinge variants.

With policy and reference log-probabilities of the chosen (c) and rejected (r) completions, each variant is a
function of the margin of log-ratios

    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))

    sigmoid  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
             DPO, Rafailov et al. 2023 (arXiv:2305.18290); eps > 0 is conservative DPO (cDPO, Mitchell 2023,
             "A note on DPO with noisy preferences"): the label is assumed flipped with probability eps.
    robust   [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)
             rDPO, Chowdhury et al. 2024 (arXiv:2403.00409): unbiased under label noise of rate eps < 1/2.
    ipo      (h - 1 / (2 beta))^2
             IPO, Azar et al. 2023 (arXiv:2310.12036), "A general theoretical paradigm ...".
    hinge    max(0, 1 - beta h)
             SLiC, Zhao et al. 2023 (arXiv:2305.10425), with beta the inverse of SLiC's margin.

At h = 0 (policy equal to the reference) the losses are log 2 (sigmoid, robust, any eps), 1 / (4 beta^2)
(ipo) and 1 (hinge).

What the caller passes: sigmoid, robust and hinge take summed log-probabilities of each completion's tokens
(`sequence_logps(...)[0]`). IPO is defined on length-averaged log-probabilities (summed log-prob divided by
the number of completion tokens, for policy and reference alike): with sums, h grows with length while the
target 1 / (2 beta) does not, so long pairs are pushed far harder than short ones.

Losses are per pair (B,); the training loop sums them and divides by the number of pairs in the window.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _sigmoid(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _ipo(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return (h - 1 / (2 * beta)) ** 2


def _hinge(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return torch.relu(1 - beta * h)


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "ipo": _ipo,
    "hinge": _hinge,
}
_SMOOTHED = ("sigmoid", "robust")


def _check(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSSES)}")
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if loss_type in _SMOOTHED and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for {loss_type!r}, got {label_smoothing}")
    if loss_type not in _SMOOTHED and label_smoothing != 0:
        raise ValueError(f"label_smoothing applies to {' and '.join(_SMOOTHED)} only, not {loss_type!r}")


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and the implicit rewards.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) completion log-probabilities, summed
            over tokens (length-averaged for "ipo"; see the module docstring). Reference ones carry no grad.
        beta: inverse temperature (strength of the pull towards the reference), > 0.
        loss_type: one of DPO_LOSSES: "sigmoid", "robust", "ipo", "hinge".
        label_smoothing: assumed rate of flipped labels, for "sigmoid" (cDPO) and "robust" (rDPO) only.
    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are beta * (policy - reference)
        log-ratios, detached.
    """
    _check(beta, loss_type, label_smoothing)
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    losses = DPO_LOSSES[loss_type](chosen_ratio - rejected_ratio, beta, label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
