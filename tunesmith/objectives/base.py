"""What an objective is (its loss, how its batches are counted and collated) and what its loss returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tunesmith.data.batching import collate


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # 0-dim, summed over the batch's loss units
    num_units: int  # loss tokens (or pairs, sequences ... for other objectives)
    metrics: dict[str, float] = field(default_factory=dict)  # summed like the loss


@dataclass(frozen=True)
class Objective:
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]
    count_units: Callable[[dict[str, torch.Tensor]], int]  # known before the forward pass
    collate: Callable[..., dict[str, torch.Tensor]] = collate  # (examples, pad_token_id) -> batch
    # Called with (model, the window's micro-batches, accelerator, step or None when evaluating) before their
    # forward passes: what a loss needs from the whole window (KTO's reference point, GRPO's rollouts) goes into
    # the batches here.
    prepare: Callable[..., None] | None = None
