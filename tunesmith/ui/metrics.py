"""metrics.jsonl read while it is being written: from a byte offset, complete lines only.

A line still being written (no newline yet) is left for the next read; a line that is not a JSON object with an
integer "step" (a crash mid-write, a damaged disk) is counted and skipped, never fatal. A file shorter than the
offset was rewritten (a resumed run drops the records after its checkpoint): the read restarts from 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.track.plots import loss_points

MAX_READ = 32 * 1024 * 1024  # bytes read per call: a huge file is read in several polls, never at once


@dataclass
class Chunk:
    """Records from `start` to `offset` (the byte after the last complete line read)."""

    records: list[dict[str, Any]]
    offset: int
    damaged: list[int] = field(default_factory=list)  # byte offsets of lines that did not parse
    reset: bool = False  # the file was rewritten: records start again from the top
    partial: bool = False  # bytes after the last newline: a line is being written


def read_chunk(path: Path, offset: int = 0) -> Chunk:
    """The complete records of `path` after byte `offset` (a missing file has none)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return Chunk([], 0, reset=offset > 0)
    reset = offset > size or offset < 0
    start = 0 if reset else offset
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(min(size - start, MAX_READ))
    end = data.rfind(b"\n") + 1
    records, damaged = parse_lines(data[:end], start)
    return Chunk(records, start + end, damaged, reset, partial=end < len(data) and start + len(data) == size)


def parse_lines(data: bytes, start: int) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, byte offsets of damaged lines) of newline-terminated JSON lines beginning at byte `start`."""
    records, damaged, position = [], [], start
    for line in data.split(b"\n")[:-1]:
        if line.strip():
            record = _record(line)
            if record is None:
                damaged.append(position)
            else:
                records.append(record)
        position += len(line) + 1
    return records, damaged


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return None
    return record


@dataclass
class Summary:
    """What the runs table shows of a metrics file."""

    records: list[dict[str, Any]]
    damaged: int
    partial: bool

    @property
    def last_step(self) -> int | None:
        return max((r["step"] for r in self.records), default=None)

    def losses(self) -> dict[str, Any]:
        """Last train loss, last and best validation loss (the best of train loss where nothing validated)."""
        train, evals = loss_points(self.records)
        best = min(evals, key=lambda p: p[1], default=None) or min(train, key=lambda p: p[1], default=None)
        return {"last_loss": train[-1][1] if train else None,
                "last_eval_loss": evals[-1][1] if evals else None,
                "best_loss": best[1] if best else None, "best_step": best[0] if best else None,
                "best_of": "eval_loss" if evals else "loss" if train else None}


_cache: dict[Path, tuple[tuple[int, int], Summary]] = {}


def summary(path: Path) -> Summary:
    """The whole file read (cached while its size and modification time stay the same)."""
    try:
        stat = os.stat(path)
    except OSError:
        return Summary([], 0, False)
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _cache.get(path)
    if cached and cached[0] == key:
        return cached[1]
    records, damaged, offset, partial = [], 0, 0, False
    while True:
        chunk = read_chunk(path, offset)
        records += chunk.records
        damaged += len(chunk.damaged)
        partial = chunk.partial
        if chunk.offset == offset or chunk.offset >= key[0]:
            break
        offset = chunk.offset
    result = Summary(records, damaged, partial)
    _cache[path] = (key, result)
    return result
