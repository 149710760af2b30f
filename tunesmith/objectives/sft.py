"""Supervised next-token loss (instruction tuning and continued pretraining)."""

from __future__ import annotations

import torch

from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.tokens import model_inputs, summed_nll


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Summed NLL of the unmasked label tokens and their count.

    Args:
        batch: input_ids, labels and attention_mask (padded) or position_ids (packed), each (B, T).
    """
    logits = model(**model_inputs(batch)).logits  # (B, T, V)
    loss_sum, num_tokens = summed_nll(logits, batch["labels"])
    return LossOutput(loss_sum, num_tokens)
