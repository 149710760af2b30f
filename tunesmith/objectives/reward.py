"""Reward-model training: the Bradley-Terry pairwise loss on scalar rewards.

Bradley and Terry 1952; as used for RLHF reward models by Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155):

    loss = -log sigma(r_c - r_r - m) + c * (r_c + r_r)^2

m is an optional per-pair margin (Llama 2, Touvron et al. 2023, arXiv:2307.09288: larger for pairs the
annotators rated as clearly different). The second term is optional (c = 0 by default): a small c (e.g.
0.01) keeps rewards centred on 0 (Eisenstein et al. 2023, arXiv:2312.09244), which the pairwise term alone
leaves free since it sees only differences. Losses are per pair (B,); accuracy is a count of pairs, so the
loop's division by pairs turns it into a fraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair reward-model loss and the number of correctly ordered pairs.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards.
        margin: optional (B,) margins m, >= 0.
        center_coef: optional weight c of the centring penalty (r_c + r_r)^2.
    Returns:
        (losses (B,), num_correct: 0-dim count of pairs with r_c > r_r strictly, detached).
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses, (diff.detach() > 0).sum()
