"""Run the longest micro-batch once before training, so a batch that does not fit fails in the first minute
with a message naming what to change, not hours later when the data's longest examples come up."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from tunesmith.data.tokenize import Example
from tunesmith.errors import ConfigError

log = logging.getLogger(__name__)


def longest_examples(examples: Sequence[Example], count: int) -> list[int]:
    """Indices of the `count` longest examples (both sides of a preference pair count)."""
    table = getattr(examples, "table", None)
    if table is not None:  # an Arrow table: lengths without reading the token lists into Python
        import pyarrow.compute as pc

        lengths = pc.list_value_length(table.data.column("input_ids")).to_numpy(zero_copy_only=False)
        if "rejected_ids" in table.column_names:
            lengths = lengths + pc.list_value_length(table.data.column("rejected_ids")).fill_null(0).to_numpy(
                zero_copy_only=False)
        order = lengths.argsort(kind="stable")[::-1]
        return [int(i) for i in order[:count]]
    lengths = [len(e.input_ids) + len(e.rejected_ids or ()) for e in examples]
    return sorted(range(len(examples)), key=lambda i: -lengths[i])[:count]


def probe_memory(model, objective, examples: Sequence[Example], micro_batch_size: int, pad_token_id: int,
                 accelerator, settings_hint: str) -> None:
    """Forward and backward on the longest micro-batch, gradients discarded (the weights do not change)."""
    if not len(examples):
        return
    batch = objective.collate([examples[i] for i in longest_examples(examples, micro_batch_size)], pad_token_id)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    try:
        if objective.prepare is not None:
            objective.prepare(model, [batch], accelerator, None)
        out = objective.loss(model, batch)
        accelerator.backward(out.loss_sum * 0.0)
    except torch.OutOfMemoryError as exc:
        raise ConfigError(f"the longest micro-batch ({batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} "
                          f"tokens) does not fit in memory: {settings_hint} ({exc})") from None
    finally:
        for p in model.parameters():
            p.grad = None
    if torch.cuda.is_available():
        log.info("longest micro-batch fits: peak %.2f GiB", torch.cuda.max_memory_allocated() / 2**30)
