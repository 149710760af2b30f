"""Token-level numerics shared by every objective: shifting, masking and summed negative log-likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model is called with: a padded batch passes attention_mask, a packed one position_ids.

    No KV cache: besides being useless in a full forward pass, a cache stops `transformers` from reading
    packed documents out of the position ids.
    """
    return {**{k: batch[k] for k in MODEL_INPUTS if k in batch}, "use_cache": False}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with logits: position t predicts token t+1; the last position predicts nothing.

    Args:
        labels: (B, T) with IGNORE_INDEX where no loss is taken.
    Returns:
        (B, T) targets, IGNORE_INDEX in the last column.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Number of positions that carry loss in a (B, T) label tensor (before shifting)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_nll(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over loss-bearing positions, in float32.

    Only the rows that carry loss are upcast, `chunk_size` rows at a time, so no full float32 copy of the
    (B, T, V) logits is made.

    Args:
        logits: (B, T, V) in any float dtype.
        labels: (B, T) unshifted, IGNORE_INDEX where no loss is taken.
    Returns:
        (loss sum as a 0-dim float32 tensor, number of loss tokens).
    """
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX  # (B, T)
    rows = logits[keep]  # (N, V)
    wanted = targets[keep]  # (N,)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start : start + chunk_size].float()
        total = total + F.cross_entropy(chunk, wanted[start : start + chunk_size], reduction="sum")
    return total, int(wanted.numel())
