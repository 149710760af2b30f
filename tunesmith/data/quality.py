"""Quality filters: length limits and the repeated-line, repeated-n-gram and non-text ratios that reject a text."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

BASIC_PUNCTUATION = ".,;:!?¿¡'\"()[]-‐–—…‘’“”„«»"
_TEXT_RUN = re.compile(r"[^\W\d_]+|\s+|[" + re.escape(BASIC_PUNCTUATION) + "]+")  # letters, spaces, punctuation


@dataclass(frozen=True)
class QualityLimits:
    """Thresholds of the quality filter; None turns a check off. Ratios are shares in [0, 1]."""

    min_chars: int | None = 1
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None
    max_repeated_line_ratio: float | None = 0.3
    max_repeated_ngram_ratio: float | None = 0.2
    repeated_ngram_size: int = 5
    max_non_text_ratio: float | None = 0.5


def repeated_line_ratio(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line (whitespace at the ends ignored)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def repeated_ngram_ratio(text: str, n: int = 5) -> float:
    """Share of word characters covered by word n-grams that occur more than once (Gopher's duplicate
    n-gram fraction; each word counted once however many repeats cover it)."""
    words = text.split()
    grams = list(zip(*(words[k:] for k in range(n))))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words))


def non_text_ratio(text: str) -> float:
    """Share of characters that are not letters (with their combining marks), whitespace or basic
    punctuation: digits, symbols, markup and code count as non-text."""
    if not text:
        return 0.0
    rest = _TEXT_RUN.sub("", text)
    return sum(not unicodedata.category(c).startswith("M") for c in rest) / len(text)


def quality_problem(text: str, limits: QualityLimits = QualityLimits()) -> str | None:
    """Why the text fails the quality limits, as "check: detail", or None when it passes."""
    num_words = len(text.split())
    problem = _outside("chars", len(text), limits.min_chars, limits.max_chars) or _outside(
        "words", num_words, limits.min_words, limits.max_words
    )
    if problem:
        return problem
    ratios = (
        ("repeated_lines", limits.max_repeated_line_ratio, repeated_line_ratio, "of lines repeat an earlier line"),
        ("repeated_ngrams", limits.max_repeated_ngram_ratio,
         lambda t: repeated_ngram_ratio(t, limits.repeated_ngram_size),
         f"of characters are in repeated {limits.repeated_ngram_size}-grams"),
        ("non_text", limits.max_non_text_ratio, non_text_ratio,
         "of characters are not letters, whitespace or basic punctuation"),
    )
    for check, limit, measure, what in ratios:
        if limit is not None and (value := measure(text)) > limit:
            return f"{check}: {value:.0%} {what} (max {limit:.0%})"
    return None


def _outside(unit: str, value: int, low: int | None, high: int | None) -> str | None:
    if low is not None and value < low:
        return f"min_{unit}: {value} {unit} < {low}"
    if high is not None and value > high:
        return f"max_{unit}: {value} {unit} > {high}"
    return None
