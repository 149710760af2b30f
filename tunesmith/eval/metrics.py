"""Answer metrics on generated text, and streamed accumulators.

Per example: `exact_match` (after `normalize_answer`), `rouge_l` (ROUGE-L F1 of `rouge-score`), `numeric_match`
(the answers' numbers are equal); the answer-reading functions themselves live in `tunesmith.data.answers`. Over a corpus: BLEU and chrF of `sacrebleu`, on its 0-100 scale.

Accumulators take predictions batch by batch and keep only sums (for BLEU and chrF: sacrebleu's own sufficient
statistics), so the memory of an evaluation does not grow with the number of examples:

    acc = make_accumulator("bleu")
    for predictions, references in batches:
        acc.update(predictions, references)
    acc.value()   # == sacrebleu.corpus_bleu(all predictions, [all references]).score
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Protocol, Sequence

from tunesmith.data.answers import exact_match, numeric_match
from tunesmith.errors import ConfigError

def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions that exactly match their reference (0.0 for no examples).

    Raises:
        ValueError: when the two sequences differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: from the longest common subsequence of words (lowercased, split on non-alphanumerics).

    P = LCS / prediction words, R = LCS / reference words, F1 = 2PR / (P + R); 0.0 when either is empty.
    """
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------------
# Streamed accumulators


class Accumulator(Protocol):
    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None: ...

    def value(self) -> dict[str, float]: ...


class MeanScore:
    """The mean of a per-example score: a running sum and count."""

    def __init__(self, name: str, score: Callable[[str, str], float]) -> None:
        self.name, self.score, self.total, self.count = name, score, 0.0, 0

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        for prediction, reference in zip(predictions, references, strict=True):
            self.total += float(self.score(prediction, reference))
            self.count += 1

    def value(self) -> dict[str, float]:
        return {self.name: self.total / self.count if self.count else 0.0}


class CorpusScore:
    """A sacrebleu corpus metric (BLEU, chrF) from its summed per-sentence sufficient statistics, the sums its
    `corpus_score` computes the score from (n-gram matches and totals, lengths)."""

    def __init__(self, name: str, metric) -> None:
        self.name, self.metric, self.stats = name, metric, None

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not predictions:
            return
        for stats in self.metric._extract_corpus_statistics(list(predictions), [list(references)]):
            self.stats = list(stats) if self.stats is None else [a + b for a, b in zip(self.stats, stats)]

    def value(self) -> dict[str, float]:
        if self.stats is None:
            return {self.name: 0.0}
        return {self.name: float(self.metric._compute_score_from_stats(list(self.stats)).score)}


class ScorerMeans:
    """Means of a user's scoring function `(prediction, reference) -> float | dict[str, float]`; a float is
    reported under the function's name."""

    def __init__(self, scorer: Callable[[str, str], float | dict[str, float]]) -> None:
        self.scorer, self.totals, self.count = scorer, {}, 0
        self.name = getattr(scorer, "__name__", "scorer")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        for prediction, reference in zip(predictions, references, strict=True):
            result = self.scorer(prediction, reference)
            values = result if isinstance(result, dict) else {self.name: result}
            for key, value in values.items():
                self.totals[key] = self.totals.get(key, 0.0) + float(value)
            self.count += 1

    def value(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.totals.items()} if self.count else {}


class LabelCounts:
    """Accuracy and macro-F1 of predicted labels, from per-label counts of true positives, false positives and
    false negatives.

    F1 of a label = 2 TP / (2 TP + FP + FN); macro-F1 is their mean over every label that occurs as a reference
    or a prediction (scikit-learn's `f1_score(average="macro")`, the labels it infers).
    """

    def __init__(self) -> None:
        self.correct, self.count = 0, 0
        self.tp: dict[str, int] = {}
        self.fp: dict[str, int] = {}
        self.fn: dict[str, int] = {}

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        for predicted, gold in zip(predictions, references, strict=True):
            self.count += 1
            for counts, label in ((self.tp, predicted), (self.fp, predicted), (self.fn, gold)):
                counts.setdefault(label, 0)
            if predicted == gold:
                self.correct += 1
                self.tp[gold] += 1
            else:
                self.fp[predicted] += 1
                self.fn[gold] += 1

    def value(self) -> dict[str, float]:
        if not self.count:
            return {"accuracy": float("nan"), "macro_f1": float("nan")}
        labels = set(self.tp) | set(self.fn)
        f1 = [2 * self.tp.get(k, 0) / (2 * self.tp.get(k, 0) + self.fp.get(k, 0) + self.fn.get(k, 0))
              for k in labels]
        return {"accuracy": self.correct / self.count, "macro_f1": sum(f1) / len(f1)}


METRIC_NAMES = ("exact_match", "rouge_l", "bleu", "chrf", "numeric")


def make_accumulator(name: str) -> Accumulator:
    """A fresh accumulator for metric `name` (one of METRIC_NAMES)."""
    if name == "exact_match":
        return MeanScore(name, exact_match)
    if name == "rouge_l":
        return MeanScore(name, rouge_l)
    if name == "numeric":
        return MeanScore(name, numeric_match)
    if name in ("bleu", "chrf"):
        from sacrebleu.metrics import BLEU, CHRF

        return CorpusScore(name, BLEU() if name == "bleu" else CHRF())
    raise ValueError(f"unknown metric {name!r} (expected one of {', '.join(METRIC_NAMES)})")


def load_scorer(spec: str, key: str = "scorer") -> Callable[[str, str], float | dict[str, float]]:
    """The function named by "package.module:function" (importable) or "path/to/file.py:function".

    Raises:
        ConfigError naming `key` when the module or function cannot be found.
    """
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise ConfigError(f"{key}: expected 'module:function' or 'file.py:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"{key}: scorer file not found: {module_name}")
            loader = importlib.util.spec_from_file_location(f"tunesmith_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {exc}") from None
    scorer = getattr(module, function, None)
    if not callable(scorer):
        raise ConfigError(f"{key}: {module_name!r} has no function {function!r}")
    return scorer
