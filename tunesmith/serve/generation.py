"""Text for chat and the server: generated token ids turned into printable text deltas as they come, with stop
strings applied. The decoding itself (rows, sampling, continuous batching) is `tunesmith.model.decode`, whose
`Row`, `Sampling` and `decode` the serving code takes from here along with `TextStream`.
"""

from __future__ import annotations

from typing import Sequence

from tunesmith.model.decode import Row, Sampling, decode

__all__ = ["Row", "Sampling", "TextStream", "decode"]


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
