"""Packing: fewer, fuller sequences, with no document seeing another.

SFT packing puts whole examples into sequences of at most `max_length` tokens by best-fit-decreasing. Each
document's position ids restart at 0; the model is then called with `position_ids` and no attention mask, and
`transformers` builds a block-diagonal causal mask from the restarts (SDPA and eager), or uses variable-length
flash attention. The first label of every document is masked: it would otherwise be predicted from the end of
the previous document. The packed loss therefore equals the sum of the per-document losses.

Pretraining packing (`pack_blocks`) concatenates documents, each ending in EOS, and cuts fixed-length blocks.
"""

from __future__ import annotations

import bisect
from typing import Sequence

from tunesmith.data.tokenize import IGNORE_INDEX, Example


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Best-fit-decreasing: longest first, each into the fullest sequence it still fits in.

    Args:
        examples: tokenised examples, none longer than `max_length`.
    Returns:
        Packed examples with `position_ids` restarting per document; `source` lists the documents.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        size = len(examples[i].input_ids)
        if size > max_length:
            raise ValueError(f"{examples[i].source}: {size} tokens do not fit in a packed length of {max_length}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([i])
            remaining, index = max_length - size, len(bins) - 1
        else:
            remaining, index = free.pop(slot)
            bins[index].append(i)
            remaining -= size
        bisect.insort(free, (remaining, index))
    return [_concatenate([examples[i] for i in sorted(members)]) for members in bins]


def _concatenate(docs: list[Example]) -> Example:
    input_ids, labels, positions = [], [], []
    for doc in docs:
        input_ids += doc.input_ids
        labels += [IGNORE_INDEX] + doc.labels[1:]  # nothing before a document predicts its first token
        positions += list(range(len(doc.input_ids)))
    return Example(input_ids, labels, ";".join(d.source for d in docs), position_ids=positions)


def pack_blocks(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Pretraining: documents concatenated in order and cut into blocks of exactly `block_size` tokens.

    The tail that does not fill a block is dropped (its size is in the report, via the token counts).
    """
    stream: list[int] = []
    blocks = []
    for e in examples:
        stream += e.input_ids
        while len(stream) >= block_size:
            chunk, stream = stream[:block_size], stream[block_size:]
            blocks.append(Example(chunk, list(chunk), f"block {len(blocks)}"))
    return blocks


def packing_efficiency(examples: Sequence[Example], max_length: int) -> float:
    """Share of the `len(examples) * max_length` token slots that hold real tokens."""
    if not examples:
        return 0.0
    return sum(len(e.input_ids) for e in examples) / (len(examples) * max_length)
