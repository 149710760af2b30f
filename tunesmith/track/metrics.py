"""`metrics.jsonl`: one JSON object per logged step, appended and flushed as it happens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsFile:
    """Appends records to `metrics.jsonl`.

    On resume from step N, records after N (written by the interrupted run past its last checkpoint) are
    removed first, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            self.path.write_text("")
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
