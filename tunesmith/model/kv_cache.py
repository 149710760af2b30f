"""A KV cache whose rows join and leave between decode steps: the storage of continuous batching.

Per layer, keys and values live in one buffer each, (S, H, C, D): S row slots, H key/value heads, C columns, D
the head dim. The B running rows fill slots 0 .. B-1, and every row ends at the same column `end`, so a decode
step writes all rows' new keys into one column, and the model's own index-based masks (causal, sliding window)
are right for every row:

    column:  lo ...................... end
    slot 0:  [ prompt 0 + generated  ]          the longest row: lo = end - max(lengths)
    slot 1:          [ prompt 1 + gen ]         the columns before a shorter row are masked (attention_mask 0)

A joining row is prefilled on its own (`begin_prefill`: its keys go into a free slot, right-aligned at `end`);
a leaving row's slot is filled with the last row's (`remove`). Buffers grow (rows doubling, columns by half)
and drop the dead columns before `lo` only when a row or a step needs the room, so a step copies nothing.

    cache.begin_prefill([5, 9])   # two rows of 5 and 9 prompt tokens join; then model(..., cache=cache)
    cache.commit_prefill()
    cache.begin_step()            # every row gets one token; then model(..., cache=cache)
    cache.commit_step()
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROWTH = 128  # the fewest columns a buffer grows by


class RowLayer(CacheLayerMixin):
    """One layer's buffers; what goes where is decided by its `RowCache`."""

    is_sliding = False

    def __init__(self, owner: "RowCache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, columns = self.owner.capacity
        shape = (rows, key_states.shape[1], columns, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)  # zeros: a masked column must never hold NaN
        self.values = value_states.new_zeros(shape[:3] + (value_states.shape[-1],))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values; returns what attention reads.

        Args:
            key_states: (n, H, P, D) for a prefill of n joining rows, (B, H, 1, D) for a step.
        Returns:
            prefill: the given states (a joining row attends to its own prompt only); step: (B, H, W + 1, D)
            views of the buffers, columns lo .. end.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.owner
        if cache.joining is not None:
            first, end, width = len(cache.lengths), cache.end, key_states.shape[2]
            for j, length in enumerate(cache.joining):  # real tokens only: padding leaves the slot as it was
                self.keys[first + j, :, end - length:end] = key_states[j, :, width - length:]
                self.values[first + j, :, end - length:end] = value_states[j, :, width - length:]
            return key_states, value_states
        rows, end, lo = len(cache.lengths), cache.end, cache.lo
        self.keys[:rows, :, end] = key_states[:, :, 0]
        self.values[:rows, :, end] = value_states[:, :, 0]
        return self.keys[:rows, :, lo:end + 1], self.values[:rows, :, lo:end + 1]

    def relayout(self, rows: int, columns: int, live: int, lo: int, end: int, shift: int) -> None:
        """New buffers of (rows, columns); the first `live` rows' columns lo .. end move by `shift`."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((rows, old.shape[1], columns, old.shape[3]))
            new[:live, :, lo + shift:end + shift] = old[:live, :, lo:end]
            setattr(self, name, new)

    def move_row(self, source: int, target: int, lo: int, end: int) -> None:
        self.keys[target, :, lo:end] = self.keys[source, :, lo:end]
        self.values[target, :, lo:end] = self.values[source, :, lo:end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_mask_sizes(query_length, 0)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return -1


class RowCache(Cache):
    """A KV cache for rows of different lengths that join and leave between steps (see the module docstring).

    `lengths[i]` is the number of tokens cached for the row in slot i; a step adds one to each.
    """

    def __init__(self, num_layers: int, max_rows: int | None = None) -> None:
        super().__init__(layers=[])
        self.layers = [RowLayer(self) for _ in range(num_layers)]
        self.max_rows = max_rows
        self.lengths: list[int] = []
        self.end = 0
        self.capacity = (0, 0)  # (row slots, columns) of the buffers
        self.joining: list[int] | None = None  # prompt lengths of the rows being prefilled

    @property
    def lo(self) -> int:
        """The first column any running row uses."""
        return self.end - max(self.lengths, default=0)

    def begin_prefill(self, lengths: list[int]) -> None:
        """Make room for rows of `lengths` prompt tokens; the next forward pass (their left-padded prompts,
        (n, max(lengths))) stores their keys."""
        self._reserve(len(self.lengths) + len(lengths), max(lengths))
        self.joining = list(lengths)

    def commit_prefill(self) -> None:
        """The prefilled rows run from now on, in slots B .. B + n - 1."""
        self.lengths += self.joining
        self.joining = None

    def begin_step(self) -> None:
        """Make room for one more column; the next forward pass ((B, 1) tokens) stores its keys there."""
        self.joining = None
        self._reserve(len(self.lengths), 0)

    def commit_step(self) -> None:
        self.end += 1
        self.lengths = [n + 1 for n in self.lengths]

    def remove(self, slot: int) -> int | None:
        """Drop the row in `slot`; the last row moves into it. Returns the slot that moved (None if none did)."""
        last = len(self.lengths) - 1
        moved = None
        if slot != last:
            for layer in self.layers:
                if layer.is_initialized:
                    layer.move_row(last, slot, self.lo, self.end)
            self.lengths[slot] = self.lengths[last]
            moved = last
        self.lengths.pop()
        if not self.lengths:
            self.reset()
        return moved

    def reset(self) -> None:
        """Empty: the buffers are freed."""
        self.lengths, self.end, self.capacity, self.joining = [], 0, (0, 0), None
        self.layers = [RowLayer(self) for _ in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before the next forward pass's (0 for joining rows: they see only their prompt)."""
        return 0 if self.joining is not None else self.end - self.lo

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def _reserve(self, rows: int, left: int) -> None:
        """Buffers with `rows` slots, `left` columns before `end` and a free column at `end`; grows them (and
        drops the dead columns before `lo`) only when that is not so already."""
        slots, columns = self.capacity
        if rows <= slots and left <= self.end < columns:
            return
        lo, live = self.lo, self.end - self.lo
        end = max(live, left)  # the live columns, moved as far left as the joining prompts allow
        if rows > slots:
            slots = min(max(rows, 2 * slots), max(rows, self.max_rows or rows))
        if end >= columns:
            columns = end + max(GROWTH, end // 2)
        for layer in self.layers:
            if layer.is_initialized:
                layer.relayout(slots, columns, len(self.lengths), lo, self.end, end - self.end)
        self.capacity, self.end = (slots, columns), end
