"""Turn examples into padded (or packed) batches, and the order batches come in."""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from tunesmith.data.tokenize import IGNORE_INDEX, Example


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


def collate_flat(examples: Sequence[Example], pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Padding-free: the examples end to end in one row, position ids restarting at each (packed examples keep
    theirs), and no position predicts the first token of the next example. The loss-bearing targets are those
    of `collate` on the same examples, in the same order; there is no padding, so `pad_token_id` is unused.

    Returns:
        input_ids, labels, token_mask (all ones) and position_ids, each (1, sum of the lengths).
    """
    input_ids, labels, positions = [], [], []
    for e in examples:
        input_ids += e.input_ids
        labels += [IGNORE_INDEX, *e.labels[1:]]  # as in a padded row, nothing predicts an example's first token
        positions += e.position_ids if e.position_ids is not None else range(len(e.input_ids))
    row = torch.tensor(input_ids)[None]
    return {"input_ids": row, "labels": torch.tensor(labels)[None], "token_mask": torch.ones_like(row),
            "position_ids": torch.tensor(positions)[None]}


def example_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of a batch's examples: its real positions, or the lengths of its conversations where a pair
    batch computes each shared prompt once (objectives/pairs.py: fewer positions than the data holds)."""
    if "sequence_lengths" in batch:
        return int(batch["sequence_lengths"].sum())
    return int(batch["token_mask"].sum())


@functools.lru_cache(maxsize=2)  # the loop asks once per step; the permutation changes once per epoch
def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a seeded permutation cut into `batch_size` pieces (last may be short).

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have.
    The result is cached: treat it as read-only.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def left_pad(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into a batch.

    Returns:
        input_ids (B, T) and attention_mask (B, T), 0 on the padding.
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, width - len(seq):] = 1
    return input_ids, attention_mask
