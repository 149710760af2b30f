"""Cleaning steps of the data pipeline: normalise, scrub personal data, filter by quality, drop duplicates.

Every step is optional and pure: it takes plain strings and returns what it changed, so a report can say how
many rows each step changed or removed and why. `clean_texts` runs the chosen steps in a fixed order:
normalise -> PII -> quality -> exact dedup -> near dedup (dedup last, so that it sees the final texts).
The steps live in `normalize`, `pii`, `quality` and `dedup`; this module holds the driver and re-exports
their public names. Which rows survive is decided by `select_rows` from per-row `Verdicts`, so texts in
memory and the pipeline's on-disk tables are filtered by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tunesmith.data.dedup import SHINGLES, dedup_groups, duplicates_of, exact_keys, near_duplicate_groups
from tunesmith.data.normalize import UNICODE_FORMS, _check_choice, normalize_text
from tunesmith.data.pii import PII_KINDS, scrub_pii
from tunesmith.data.quality import QualityLimits, quality_problem
from tunesmith.errors import ConfigError

STEPS = ("normalize", "pii", "quality", "exact_dedup", "near_dedup")
NEAR_DEDUP_MODES = ("off", "group", "drop")


@dataclass(frozen=True)
class CleanSteps:
    """Which cleaning steps run, with their settings. Content-changing and probabilistic steps are off
    unless asked for.

    near_dedup: "off"; "group" finds near-duplicate groups and keeps every row (so that a split can keep
    each group on one side); "drop" also keeps only the first row of each group.
    """

    normalize: bool = True
    unicode_form: str = "NFC"
    max_blank_lines: int = 2
    pii: bool = False
    pii_kinds: tuple[str, ...] = PII_KINDS
    quality: QualityLimits | None = None
    exact_dedup: bool = True
    near_dedup: str = "off"
    near_threshold: float = 0.8
    shingle: str = "word"
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1

    def __post_init__(self) -> None:
        for name, ok, expected in (
            ("max_blank_lines", self.max_blank_lines >= 0, ">= 0"),
            ("near_threshold", 0.0 < self.near_threshold <= 1.0, "in (0, 1]"),
            ("ngram", self.ngram >= 1, ">= 1"),
            ("num_perm", self.num_perm >= 2, ">= 2"),
        ):
            if not ok:
                raise ConfigError(f"clean: {name} must be {expected}, got {getattr(self, name)!r}")
        _check_choice("unicode_form", self.unicode_form, UNICODE_FORMS)
        _check_choice("near_dedup", self.near_dedup, NEAR_DEDUP_MODES)
        _check_choice("shingle", self.shingle, SHINGLES)
        for kind in self.pii_kinds:
            _check_choice("PII kind", kind, PII_KINDS)


@dataclass
class StepCount:
    changed: int = 0
    removed: int = 0


@dataclass
class CleanReport:
    """What each step did: rows changed and removed, placeholders by kind, why each removed row went."""

    num_rows: int
    steps: dict[str, StepCount] = field(default_factory=lambda: {step: StepCount() for step in STEPS})
    pii: dict[str, int] = field(default_factory=dict)  # placeholders inserted, by kind
    quality: dict[str, int] = field(default_factory=dict)  # rows dropped, by failed check
    removed: dict[int, str] = field(default_factory=dict)  # row -> reason
    duplicate_of: dict[int, int] = field(default_factory=dict)  # removed duplicate row -> row kept
    near_groups: list[list[int]] = field(default_factory=list)  # original row indices

    @property
    def num_kept(self) -> int:
        return self.num_rows - len(self.removed)

    def group_ids(self, rows: Sequence[int]) -> list[int | None]:
        """The near-duplicate group (index into near_groups) of each row, or None: what a split keeps whole."""
        group_of = {row: g for g, group in enumerate(self.near_groups) for row in group}
        return [group_of.get(row) for row in rows]

    def summary(self) -> str:
        """A few lines for the log."""
        lines = [f"cleaning: kept {self.num_kept} of {self.num_rows} rows"]
        for step, c in self.steps.items():
            if c.changed or c.removed:
                lines.append(f"  {step}: {c.changed} changed, {c.removed} removed")
        if self.pii:
            lines.append("  PII replaced: " + ", ".join(f"{k} {n}" for k, n in sorted(self.pii.items())))
        if self.quality:
            lines.append("  quality drops: " + ", ".join(f"{k} {n}" for k, n in sorted(self.quality.items())))
        if self.near_groups:
            lines.append(f"  near-duplicate groups: {len(self.near_groups)} "
                         f"({sum(map(len, self.near_groups))} rows)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def clean_texts(texts: Sequence[str], steps: CleanSteps = CleanSteps()) -> tuple[list[int], list[str], CleanReport]:
    """Run the chosen steps in order: normalise -> PII -> quality -> exact dedup -> near dedup.

    Returns:
        kept: indices of the rows that survive, ascending.
        new_texts: the cleaned text of every row (removed rows included), aligned with `texts`.
        report: counts per step and the reason for every removed row.
    """
    report = CleanReport(len(texts))
    new_texts = list(texts)
    if steps.normalize:
        _run_normalize(new_texts, steps, report)
    if steps.pii:
        _run_pii(new_texts, steps, report)
    kept = select_rows(text_verdicts(new_texts, steps), steps, report)
    return kept.tolist(), new_texts, report


@dataclass
class Verdicts:
    """What the filters and duplicate detection found out about the rows, wherever their texts are: in memory
    (`text_verdicts`) or in a table on disk, a chunk at a time (`rowclean.clean_store`)."""

    problems: dict[int, str]  # row -> why it fails the quality limits ("check: detail"); passing rows absent
    exact_keys: np.ndarray | None  # (N, 2) uint64 `exact_keys` of every row, when exact dedup runs
    near_groups: Callable[[np.ndarray], list[list[int]]] | None  # rows -> their near-duplicate groups


def text_verdicts(texts: Sequence[str], steps: CleanSteps) -> Verdicts:
    """The verdicts on texts in memory; signatures are computed only for the rows that reach near dedup."""

    def near_groups(rows: np.ndarray) -> list[list[int]]:
        groups = near_duplicate_groups([texts[i] for i in rows], steps.near_threshold, steps.shingle, steps.ngram,
                                       steps.num_perm, steps.seed)
        return [rows[group].tolist() for group in groups]

    return Verdicts(quality_problems(texts, steps.quality) if steps.quality is not None else {},
                    exact_keys(texts) if steps.exact_dedup else None,
                    near_groups if steps.near_dedup != "off" else None)


def quality_problems(texts: Sequence[str], limits: QualityLimits, first: int = 0) -> dict[int, str]:
    """Row (counted from `first`) -> `quality_problem`, for the texts that fail the limits."""
    problems = {}
    for i, text in enumerate(texts, start=first):
        if (problem := quality_problem(text, limits)) is not None:
            problems[i] = problem
    return problems


def select_rows(verdicts: Verdicts, steps: CleanSteps, report: CleanReport) -> np.ndarray:
    """The rows that survive the quality filter, exact dedup and near dedup, in that order (each step sees only
    the rows the earlier ones kept); records in `report` what each step removed and why.

    Returns:
        (K,) int64 indices of the kept rows, ascending.
    """
    kept = np.arange(report.num_rows)
    if steps.quality is not None:
        kept = _drop_failing(kept, verdicts.problems, report)
    if steps.exact_dedup:
        local = duplicates_of(verdicts.exact_keys[kept])  # positions in `kept`
        kept = _drop_duplicates(kept, {int(kept[j]): int(kept[k]) for j, k in local.items()}, "exact_dedup", report)
    if steps.near_dedup != "off":
        report.near_groups = verdicts.near_groups(kept)
        if steps.near_dedup == "drop":
            kept = _drop_duplicates(kept, dedup_groups(report.near_groups), "near_dedup", report)
    return kept


def _run_normalize(texts: list[str], steps: CleanSteps, report: CleanReport) -> None:
    for i, text in enumerate(texts):
        texts[i], changed = normalize_text(text, steps.unicode_form, steps.max_blank_lines)
        report.steps["normalize"].changed += changed


def _run_pii(texts: list[str], steps: CleanSteps, report: CleanReport) -> None:
    for i, text in enumerate(texts):
        texts[i], counts = scrub_pii(text, steps.pii_kinds)
        report.steps["pii"].changed += bool(counts)
        for kind, n in counts.items():
            report.pii[kind] = report.pii.get(kind, 0) + n


def _drop_failing(rows: np.ndarray, problems: dict[int, str], report: CleanReport) -> np.ndarray:
    for row, problem in sorted(problems.items()):
        check = problem.split(":")[0]
        report.quality[check] = report.quality.get(check, 0) + 1
        report.removed[row] = f"quality: {problem}"
    report.steps["quality"].removed += len(problems)
    return _without(rows, problems)


def _drop_duplicates(rows: np.ndarray, duplicate_of: dict[int, int], step: str, report: CleanReport) -> np.ndarray:
    """Remove each duplicate row (a key of `duplicate_of`), recording the row it duplicates."""
    for row, first in duplicate_of.items():
        report.removed[row] = f"{step}: duplicate of row {first}"
        report.duplicate_of[row] = first
    report.steps[step].removed += len(duplicate_of)
    return _without(rows, duplicate_of)


def _without(rows: np.ndarray, removed: dict[int, Any]) -> np.ndarray:
    return rows[~np.isin(rows, np.fromiter(removed, dtype=np.int64, count=len(removed)))]
