"""Supervised next-token loss (instruction tuning and continued pretraining)."""

from __future__ import annotations

import torch

from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.tokens import answer_logits, summed_nll


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Summed NLL of the unmasked label tokens and their count (logits only where a label is predicted).

    Args:
        batch: input_ids, labels and attention_mask (padded) or position_ids (packed), each (B, T).
    """
    loss_sum, num_tokens = summed_nll(*answer_logits(model, batch))
    return LossOutput(loss_sum, num_tokens)
