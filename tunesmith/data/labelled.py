"""Text + label rows as a classifier reads them: tokenised, truncated, and batched with left padding.

Rows are padded on the left, with position ids counted over the real tokens: the last position is every row's
last real token whatever reads it (the model's own pooling, or a soft prompt fed as embeddings, where padding
cannot be seen), and a row's outputs do not depend on how much padding it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tunesmith.data.pipeline import length_histogram
from tunesmith.data.tokenize import DataReport
from tunesmith.errors import DataError


@dataclass
class LabelledText:
    """A tokenised text and its target: a class id, or a number for regression."""

    input_ids: list[int]
    target: int | float
    source: str = ""
    rejected_ids = None  # not a pair (what the loop's helpers ask any example)

    @property
    def num_loss_tokens(self) -> int:  # what reports count: one prediction per row
        return 1


def encode_labelled(tokenizer, rows: Sequence, labels: Sequence[str] | None, max_len: int
                    ) -> tuple[list[LabelledText], dict]:
    """Tokenise text + label rows (truncated at the right to `max_len` tokens).

    Args:
        labels: class names in id order, or None for regression (labels are then numbers).
    Returns:
        the examples and a split report (rows, examples, truncated, tokens ...) like the token pipeline's.
    """
    report = DataReport(rows=len(rows))
    ids = tokenizer([r.text for r in rows], add_special_tokens=True)["input_ids"] if rows else []
    index = {name: i for i, name in enumerate(labels)} if labels is not None else None
    out = []
    for row, row_ids in zip(rows, ids):
        if len(row_ids) > max_len:
            report.truncated += 1
            row_ids = row_ids[:max_len]
        out.append(LabelledText(row_ids, _target(row, index), row.source))
        report.lengths.append(len(row_ids))
    report.examples = report.loss_tokens = len(out)
    report.tokens = sum(report.lengths)
    return out, {**report.as_dict(), "length_histogram": length_histogram(report.lengths)}


def _target(row, index: dict[str, int] | None) -> int | float:
    if index is None:
        try:
            return float(row.label)
        except ValueError:
            raise DataError(f"{row.source}: label: regression needs a number, got {row.label!r}") from None
    if row.label not in index:
        raise DataError(f"{row.source}: label: {row.label!r} is not one of the classes {list(index)}")
    return index[row.label]


def collate_labelled(examples: Sequence[LabelledText], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask, position_ids, token_mask (B, T) and class_labels (B,) long or
    targets (B,) float."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, width - len(e.input_ids):] = torch.tensor(e.input_ids)
        mask[i, width - len(e.input_ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "token_mask": mask}
    if isinstance(examples[0].target, float):
        batch["targets"] = torch.tensor([e.target for e in examples], dtype=torch.float32)
    else:
        batch["class_labels"] = torch.tensor([e.target for e in examples], dtype=torch.long)
    return batch
