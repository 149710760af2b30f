"""Best-checkpoint tracking and early stopping on a validation metric.

The history of the metric (step, value) lives in `checkpoints/best.json`, rewritten after every validation
pass; on resume, passes after the resumed step are dropped, so a replayed pass is never counted twice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ConfigError

FILE = "best.json"


@dataclass
class BestTracker:
    metric: str  # a key of the eval record, e.g. eval_loss or eval_exact_match
    mode: str  # min or max
    patience: int | None = None  # validation passes without improvement before stopping
    history: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def create(cls, metric: str, mode: str, patience: int | None, root: Path, resume_step: int = 0) -> "BestTracker":
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        if mode == "auto":
            mode = "min" if any(w in metric for w in ("loss", "perplexity")) else "max"
        tracker = cls(metric, mode, patience)
        path = root / FILE
        if resume_step and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("metric") == metric:
                tracker.history = [(int(s), float(v)) for s, v in saved["history"] if s <= resume_step]
        return tracker

    @property
    def best(self) -> tuple[int, float] | None:
        if not self.history:
            return None
        valid = [sv for sv in self.history if not math.isnan(sv[1])]
        if not valid:
            return None
        sign = 1 if self.mode == "min" else -1
        return min(valid, key=lambda sv: (sign * sv[1], sv[0]))  # ties: the earlier step

    def update(self, step: int, record: dict) -> bool:
        """Record this pass's value; True when it is the best so far (ties keep the earlier step)."""
        if self.metric not in record:
            raise ConfigError(f"eval.best_metric: {self.metric!r} is not among this run's validation metrics "
                              f"({', '.join(sorted(k for k in record if k.startswith('eval_')))})")
        value = float(record[self.metric])
        previous = self.best
        self.history.append((step, value))
        if math.isnan(value):
            return False
        return previous is None or (value < previous[1] if self.mode == "min" else value > previous[1])

    def exhausted(self) -> bool:
        """Whether the last `patience` passes brought no improvement."""
        if not self.patience or self.best is None:
            return False
        since = sum(1 for step, _ in self.history if step > self.best[0])
        return since >= self.patience

    def write(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        best = self.best
        payload = {"metric": self.metric, "mode": self.mode, "best_step": best[0] if best else None,
                   "best_value": best[1] if best else None, "history": self.history}
        tmp = root / (FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, root / FILE)
