"""Build the train/validation examples of a run and turn them into padded batches."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from tunesmith.data.formats import Row, load_rows
from tunesmith.data.tokenize import IGNORE_INDEX, DataReport, Example, tokenize_rows
from tunesmith.errors import DataError


@dataclass
class Datasets:
    train: list[Example]
    validation: list[Example]
    train_report: DataReport
    validation_report: DataReport


def build_datasets(
    tokenizer,
    train_files: Sequence[str],
    validation_files: Sequence[str] = (),
    fmt: str = "auto",
    system_prompt: str | None = None,
    max_seq_len: int = 1024,
    train_on_prompt: bool = False,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> Datasets:
    """Read, normalise and tokenise the files of a run; split off validation rows when asked."""
    train_rows = _read(train_files, fmt, system_prompt)
    validation_rows = _read(validation_files, fmt, system_prompt)
    if validation_fraction and not validation_rows:
        train_rows, validation_rows = split_rows(train_rows, validation_fraction, seed)
    train, train_report = tokenize_rows(tokenizer, train_rows, max_seq_len, train_on_prompt)
    validation, validation_report = tokenize_rows(tokenizer, validation_rows, max_seq_len, train_on_prompt)
    if not train:
        raise DataError(
            f"{', '.join(train_files)}: no example has a loss-bearing token left after truncation to "
            f"data.max_seq_len={max_seq_len} ({train_report.dropped_no_loss_tokens} dropped)"
        )
    return Datasets(train, validation, train_report, validation_report)


def _read(files: Sequence[str], fmt: str, system_prompt: str | None) -> list[Row]:
    rows: list[Row] = []
    for path in files:
        rows += load_rows(path, fmt, system_prompt)
    return rows


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded random split; at least one row on each side."""
    if len(rows) < 2:
        raise DataError(f"{rows[0].source if rows else 'data'}: too few rows to split off a validation set")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding never carries loss, whatever the pad id is.

    Returns:
        input_ids, labels (IGNORE_INDEX on padding) and token_mask (1 on real tokens), each (B, T); plus
        attention_mask (B, T) for ordinary batches, or position_ids (B, T) for packed ones, where they restart
        at every document (padding forms a segment of its own) and the model builds the block-diagonal mask.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    token_mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = examples[0].position_ids is not None
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        token_mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e.position_ids)
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels, "token_mask": token_mask}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = token_mask
    return batch


@functools.lru_cache(maxsize=2)  # the loop asks once per step; the permutation changes once per epoch
def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a seeded permutation cut into `batch_size` pieces (last may be short).

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have.
    The result is cached: treat it as read-only.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]
