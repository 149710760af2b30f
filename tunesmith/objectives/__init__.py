"""Objectives: small functions from (model, batch) to a summed loss and its normaliser.

The training loop divides the summed loss by the global count of loss units (tokens for SFT and CLM) over a
whole accumulation window, so gradient accumulation and multi-process training give the same update as one
large batch. Add an objective by writing one function and registering it in OBJECTIVES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tunesmith.data.batching import collate
from tunesmith.objectives.base import LossOutput
from tunesmith.objectives.sft import sft_loss
from tunesmith.objectives.tokens import count_loss_tokens


@dataclass(frozen=True)
class Objective:
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]
    count_units: Callable[[dict[str, torch.Tensor]], int]  # known before the forward pass
    collate: Callable[..., dict[str, torch.Tensor]] = collate  # (examples, pad_token_id) -> batch


def _token_units(batch: dict[str, torch.Tensor]) -> int:
    return count_loss_tokens(batch["labels"])


# Continued pretraining (clm) and SFT share the loss: next-token NLL where labels are not masked. They
# differ only in the data (raw text: every token supervised; chat: assistant turns).
OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(sft_loss, _token_units),
    "clm": Objective(sft_loss, _token_units),
}

__all__ = ["LossOutput", "Objective", "OBJECTIVES"]
