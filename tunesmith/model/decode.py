"""Batched token-by-token decoding with continuous batching: rows join a running batch between steps and leave it
when they finish, each with its own sampling settings, random stream, stop tokens and length limit. The serve
engine, chat and `tunesmith eval` generation all decode here.

    rows = [Row(prompt_ids, max_new_tokens=64, sampling=Sampling(temperature=0.7, top_p=0.9, seed=1))]
    for step in decode(model, rows, stop_ids={2, 5}, pad_id=0, max_rows=32):
        for index, token_id, finish_reason in step: ...

A `Batch` holds the running rows and their `RowCache`. A joining row is prefilled on its own (its left-padded
prompt, alone or with the other rows joining at the same time) and its keys go into a free slot of the cache;
every step then feeds each running row its last token at its own position (prompt length + tokens so far), with
an attention mask that hides the columns before its first token. So a row computes what it would alone, whoever
it shares the batch with and whenever it joined. A finished or cancelled row leaves at once.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tunesmith.data.batching import left_pad
from tunesmith.model.kv_cache import RowCache


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_p keeps the smallest set of most likely tokens whose probability reaches it;
    seed makes sampling repeatable (None: a fresh random seed)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


@dataclass(eq=False)
class Row:
    """One prompt to continue. `cancelled` may be set from another thread; the row then leaves the batch."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = self.sampling.generator()


Event = tuple[Row, int, "str | None"]  # (row, token id, finish reason: "stop", "length" or None)
Step = list[tuple[int, int, "str | None"]]  # the same with the row's index in the rows given to `decode`


class Batch:
    """The running rows of one model (one adapter): `add` prefills joining rows, `step` decodes one token for
    every running row. Both return one event per row that got a token, in slot order; a row leaves the batch
    with its last event ("stop": a stop token, which the event carries; "length": its `max_new_tokens`-th
    token) or, silently, once cancelled."""

    def __init__(self, model, stop_ids: Sequence[int], pad_id: int, max_rows: int | None = None):
        self.model = model
        self.stops = set(stop_ids)
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.cache = RowCache(model.config.get_text_config().num_hidden_layers, max_rows)
        self.rows: list[Row] = []  # in slot order
        self.counts: list[int] = []  # tokens generated per row
        self.last: list[int] = []  # each row's latest token: the next step's input

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, rows: Sequence[Row]) -> list[Event]:
        """Prefill `rows` (one forward pass over their left-padded prompts) and sample their first tokens."""
        rows = [r for r in rows if not r.cancelled]
        if not rows:
            return []
        input_ids, attention_mask = left_pad([r.prompt_ids for r in rows], self.pad_id)  # (n, P) each
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (n, P): real tokens count from 0
        self.cache.begin_prefill([len(r.prompt_ids) for r in rows])
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=positions.to(self.device), cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache.commit_prefill()
        self.rows += rows
        self.counts += [0] * len(rows)
        self.last += [0] * len(rows)
        first = len(self.rows) - len(rows)
        return self._advance(range(first, len(self.rows)), sample(out.logits[:, -1], rows))

    @torch.no_grad()
    def step(self) -> list[Event]:
        """One token for every running row (one forward pass of (B, 1) tokens)."""
        for slot in reversed(range(len(self.rows))):
            if self.rows[slot].cancelled:
                self._remove(slot)
        if not self.rows:
            return []
        width = max(self.cache.lengths) + 1  # columns attention reads (lo .. end): the longest row + the new token
        lengths = torch.tensor(self.cache.lengths, device=self.device)  # (B,) tokens cached per row
        columns = torch.arange(width, device=self.device)
        attention_mask = (columns[None, :] >= width - 1 - lengths[:, None]).long()  # (B, width): 0 left of a row
        self.cache.begin_step()
        out = self.model(input_ids=torch.tensor(self.last, device=self.device)[:, None],
                         attention_mask=attention_mask, position_ids=lengths[:, None], cache=self.cache,
                         use_cache=True)
        self.cache.commit_step()
        return self._advance(range(len(self.rows)), sample(out.logits[:, -1], self.rows))

    def _advance(self, slots: range, tokens: torch.Tensor) -> list[Event]:
        """Count each slot's new token (tokens: (len(slots),)), return the events and let finished rows go."""
        events, finished = [], []
        for slot, token in zip(slots, tokens.tolist()):
            row = self.rows[slot]
            if row.cancelled:
                finished.append(slot)
                continue
            self.counts[slot] += 1
            self.last[slot] = token
            reason = "stop" if token in self.stops else "length" if self.counts[slot] >= row.max_new_tokens else None
            events.append((row, token, reason))
            if reason is not None:
                finished.append(slot)
        for slot in reversed(finished):  # highest first: the last row, moved into a hole, is never a finished one
            self._remove(slot)
        return events

    def _remove(self, slot: int) -> None:
        moved = self.cache.remove(slot)
        for values in (self.rows, self.counts, self.last):
            if moved is not None:
                values[slot] = values[moved]
            values.pop()


def decode(model, rows: Sequence[Row], stop_ids: Sequence[int] | set[int], pad_id: int,
           max_rows: int | None = None) -> Iterator[Step]:
    """Generate for all rows, at most `max_rows` at a time (all of them by default): a waiting row joins as soon as
    another leaves. Yields, after each forward pass, the events of the rows that got a token then.

    Nothing is yielded for a row after its finish: "stop" at a stop token (the event carries it), "length" at its
    `max_new_tokens`-th token; a cancelled row ends silently.
    """
    batch = Batch(model, list(stop_ids), pad_id, max_rows)
    index = {id(row): i for i, row in enumerate(rows)}
    waiting = deque(rows)
    room = max_rows or max(1, len(rows))
    while waiting or batch:
        joining = [waiting.popleft() for _ in range(min(room - len(batch), len(waiting)))]
        for events in (batch.add(joining), batch.step()):
            if events:
                yield [(index[id(row)], token, reason) for row, token, reason in events]


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a draw from the temperature-scaled, top-p
    truncated distribution with the row's own generator.

    Args:
        logits: (B, V) next-token logits.
    Returns:
        (B,) token ids on the logits' device.
    """
    tokens = logits.argmax(-1)
    for j, row in enumerate(rows):
        if row.sampling.temperature > 0:
            tokens[j] = _draw(logits[j].float().cpu(), row.sampling, row.generator)
    return tokens


def _draw(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / sampling.temperature, dim=-1)  # (V,)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p (so the most likely one is always kept)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return torch.multinomial(probs, 1, generator=generator).item()
