"""Answer metrics on generated text."""

from __future__ import annotations

from typing import Sequence

_TRAILING_PUNCTUATION = ".,;:!?\"'"


def normalize_answer(text: str) -> str:
    """Strip, casefold, collapse runs of whitespace to one space and drop trailing punctuation.

    "  The  Marnburg. " -> "the marnburg"
    """
    text = " ".join(text.casefold().split())
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether `prediction` equals `reference` after `normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(reference)


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
