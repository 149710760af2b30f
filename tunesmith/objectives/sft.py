"""Supervised next-token loss (instruction tuning and continued pretraining)."""

from __future__ import annotations

import torch

from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.head import head_nll
from tunesmith.objectives.tokens import answer_logits, summed_nll


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = True) -> LossOutput:
    """Summed NLL of the unmasked label tokens and their count.

    With `fused`, the head and the loss run on the loss-bearing positions only (`head.head_nll`) when the model
    allows it; otherwise the model's logits from the batch's first predicted token on (`tokens.answer_logits`).

    Args:
        batch: input_ids, labels and attention_mask (padded) or position_ids (packed), each (B, T).
    """
    result = head_nll(model, batch) if fused else None
    if result is None:
        result = summed_nll(*answer_logits(model, batch))
    return LossOutput(*result)
