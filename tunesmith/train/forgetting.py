"""Forgetting, seen while it happens: the general eval sets (`eval.general`, or sets marked `general`) scored before
the first step and at every validation pass, with a warning, or a stop, when one falls too far.

Each set is judged by one headline number:

    generate    its first metric (exact_match, rouge_l: 0-1; bleu, chrf: 0-100), higher is better
    choice      accuracy, higher is better
    classify    accuracy, higher is better
    loss        perplexity, lower is better

and a drop is measured in points: percentage points for a 0-1 score (0.93 -> 0.80 is 13 points), the score's own
points for BLEU and chrF, and the percent rise of perplexity. `eval.forgetting_max_drop` (default 10) is the
largest drop that passes; beyond it `eval.on_forgetting: warn` logs a warning (terminal, train.log, and the
run's report) and `stop` ends the run, its final/ holding the last validation pass still within the limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

HUNDRED_POINT_METRICS = ("bleu", "chrf")


@dataclass(frozen=True)
class Headline:
    """A set's headline score."""

    metric: str
    value: float
    higher_is_better: bool = True

    def drop_from(self, before: "Headline") -> float:
        """Points lost since `before` (negative: improved)."""
        if not self.higher_is_better:
            return 100.0 * (self.value / before.value - 1.0) if before.value > 0 else 0.0
        scale = 1.0 if self.metric in HUNDRED_POINT_METRICS else 100.0
        return scale * (before.value - self.value)


def headline(result: dict) -> Headline:
    """The headline of one `eval.harness.run_set` result."""
    metrics = {k: v for k, v in result["metrics"].items() if k != "n"}
    if result["kind"] == "loss":
        return Headline("perplexity", float(metrics["perplexity"]), higher_is_better=False)
    if result["kind"] in ("choice", "classify"):
        return Headline("accuracy", float(metrics["accuracy"]))
    name = next(iter(metrics))  # generate: the first metric asked for
    return Headline(name, float(metrics[name]))


@dataclass
class ForgettingGuard:
    """Scores the general sets on the model under training and compares them with the scores before step 1.

    `score(model)` returns each general set's `run_set` result by name.
    """

    score: Callable[[object], dict[str, dict]]
    max_drop: float = 10.0
    stop: bool = False
    baseline: dict[str, Headline] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)  # set name -> the largest drop seen (points)

    def start(self, model) -> dict[str, float]:
        """Score the model before training; returns the metrics to log at step 0."""
        self.baseline = {name: headline(r) for name, r in self.score(model).items()}
        for name, h in self.baseline.items():
            log.info("general set %s before training: %s %.4f", name, h.metric, h.value)
        return {f"general_{name}_{h.metric}": h.value for name, h in self.baseline.items()}

    def check(self, model, step: int) -> tuple[dict[str, float], bool]:
        """Score the model now; returns the metrics to log and whether a set fell beyond `max_drop`."""
        metrics, tripped = {}, False
        for name, result in self.score(model).items():
            now, before = headline(result), self.baseline[name]
            drop = now.drop_from(before)
            self.worst[name] = max(self.worst.get(name, drop), drop)
            metrics[f"general_{name}_{now.metric}"] = now.value
            metrics[f"general_{name}_drop"] = drop
            if drop > self.max_drop:
                tripped = True
                log.warning("forgetting at step %d: general set %s %s %.4f -> %.4f (%.1f points lost > "
                            "eval.forgetting_max_drop %g)%s", step, name, now.metric, before.value, now.value, drop,
                            self.max_drop, "; stopping (eval.on_forgetting=stop)" if self.stop else "")
        return metrics, tripped

    def baseline_state(self) -> dict:
        """The scores before training, for a checkpoint's state.json (`restore_baseline` reads them back)."""
        return {name: [h.metric, h.value, h.higher_is_better] for name, h in self.baseline.items()}

    def restore_baseline(self, state: dict | None) -> None:
        """On --resume: the scores the run started from, not those of the checkpoint's weights."""
        self.baseline = {name: Headline(*values) for name, values in (state or {}).items()}

    def summary(self) -> dict:
        """For the run's report: each set's score before training and its largest drop."""
        return {name: {"metric": h.metric, "before": h.value, "largest_drop": self.worst.get(name),
                       "exceeded": (self.worst.get(name) or 0.0) > self.max_drop}
                for name, h in self.baseline.items()}
