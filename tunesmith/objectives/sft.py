"""Supervised next-token loss (instruction tuning and continued pretraining)."""

from __future__ import annotations

import torch

from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.tokens import summed_nll


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Summed NLL of the unmasked label tokens and their count.

    Args:
        batch: input_ids, attention_mask, labels, each (B, T).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    loss_sum, num_tokens = summed_nll(logits, batch["labels"])
    return LossOutput(loss_sum, num_tokens)
