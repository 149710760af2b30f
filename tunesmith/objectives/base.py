"""What every objective returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # 0-dim, summed over the batch's loss units
    num_units: int  # loss tokens (or pairs, sequences ... for other objectives)
    metrics: dict[str, float] = field(default_factory=dict)  # summed like the loss
