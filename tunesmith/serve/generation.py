"""Token-by-token generation for chat and the server: several prompts decoded together with a KV cache, each with
its own sampling settings, stop tokens and length limit, and text streamed out as it becomes printable.

    rows = [Row(prompt_ids, max_new_tokens=64, sampling=Sampling(temperature=0.7, top_p=0.9, seed=1))]
    for step in decode(model, rows, stop_ids={2, 5}, pad_id=0):
        for index, token_id, finish_reason in step: ...

Prompts are left-padded, so every row's next token is read from the last column; position ids count only real
tokens, so a padded row computes what it would alone. A finished row leaves the batch (its cache rows are
dropped) and the others go on.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tunesmith.data.batching import left_pad


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


@dataclass
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


Step = list[tuple[int, int, "str | None"]]  # (row index, token id, finish reason: "stop", "length" or None)


@torch.no_grad()
def decode(model, rows: Sequence[Row], stop_ids: set[int] | Sequence[int], pad_id: int) -> Iterator[Step]:
    """Generate for all rows together; yields, after each forward pass, one event per row still running.

    A row finishes with "stop" when it produces a stop token (the event carries that token), with "length" at its
    `max_new_tokens`-th token, and silently when cancelled. Nothing is yielded for a row after its finish.
    """
    stops = set(stop_ids)
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad([r.prompt_ids for r in rows], pad_id)  # (B, T) each
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]  # logits (B, V)
    next_positions = positions[:, -1:] + 1  # (B, 1)
    active = list(range(len(rows)))
    counts = [0] * len(rows)
    while True:
        tokens = sample(logits, [rows[i] for i in active])  # (B,)
        step, keep = [], []
        for j, (i, token) in enumerate(zip(active, tokens.tolist())):
            if rows[i].cancelled:
                continue
            counts[i] += 1
            reason = "stop" if token in stops else "length" if counts[i] >= rows[i].max_new_tokens else None
            step.append((i, token, reason))
            if reason is None:
                keep.append(j)
        if step:
            yield step
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, attention_mask, next_positions = tokens[index], attention_mask[index], next_positions[index]
            active = [active[j] for j in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
        out = model(input_ids=tokens[:, None].to(device), attention_mask=attention_mask,
                    position_ids=next_positions, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        next_positions = next_positions + 1


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


class TextStream:
    """Turns generated token ids into text deltas as soon as they are printable, and applies stop strings.

    Text is decoded over a short window of recent tokens, so a multi-byte character split over tokens is only
    sent once complete, and a tokenizer that drops a leading space at the start of a decode does not lose it.
    Text that could be the beginning of a stop string is held back until it is clear that it is not one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.pending = ""
        self.stopped = False  # a stop string was found: everything from it on is dropped

    def push(self, token_id: int) -> str:
        """Add one token; returns the text now safe to show (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""  # an incomplete character, or nothing visible yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(now[len(before):])

    def finish(self) -> str:
        """The text held back at the end of generation (an incomplete character is sent as U+FFFD, as a full
        decode would show it)."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        text = self._release(now[len(before):]) if len(now) > len(before) else ""
        if not self.stopped:
            text, self.pending = text + self.pending, ""
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _release(self, text: str) -> str:
        self.pending += text
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        found = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[:min(found)], "", True
            return out
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out
