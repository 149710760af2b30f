"""Cleaning applied to normalised rows: text steps on every field, filters and dedup on the whole row.

Normalisation and personal-data scrubbing rewrite each string a row holds (every message's content, the
prompt, the answers ...); quality filters and duplicate detection look at the row's text as a whole.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable

from tunesmith.data.clean import CleanSteps, clean_texts
from tunesmith.data.normalize import normalize_text
from tunesmith.data.pii import scrub_pii
from tunesmith.data.formats import Row

TEXT_FIELDS = ("text", "prompt", "completion", "chosen", "rejected")
MAX_LISTED = 20


def row_text(row: Row) -> str:
    """All the text of a row, in a fixed order, for filters and duplicate detection."""
    parts = [m["content"] for m in row.messages]
    parts += [getattr(row, f) for f in TEXT_FIELDS if getattr(row, f) is not None]
    if row.record is not None:
        parts += [str(v) for _, v in sorted(row.record.items()) if isinstance(v, (str, int, float))]
    return "\n".join(parts)


def map_text(row: Row, fn: Callable[[str], str]) -> Row:
    """The row with `fn` applied to every string it holds; the same object when nothing changed (most rows,
    so cleaning does not hold a second copy of the corpus)."""
    changes: dict[str, Any] = {}
    for f in TEXT_FIELDS:
        value = getattr(row, f)
        if value is not None and (new := fn(value)) != value:
            changes[f] = new
    contents = [fn(m["content"]) for m in row.messages]
    if any(new != m["content"] for new, m in zip(contents, row.messages)):
        changes["messages"] = tuple({**m, "content": new} for m, new in zip(row.messages, contents))
    if row.record is not None:
        record = {k: fn(v) if isinstance(v, str) else v for k, v in row.record.items()}
        if record != row.record:
            changes["record"] = record
    return dataclasses.replace(row, **changes) if changes else row


def clean_rows(rows: list[Row], steps: CleanSteps) -> tuple[list[Row], list[Any] | None, dict]:
    """Run the cleaning steps on rows.

    Returns:
        kept rows (in order); the near-duplicate group of each kept row (rows in no group get a group of their
        own), or None when near-duplicate detection is off; and a report of what every step did.
    """
    report: dict[str, Any] = {"rows": len(rows)}
    if steps.normalize:
        rows, report["normalize"] = _rewrite(rows, lambda t: normalize_text(t, steps.unicode_form,
                                                                            steps.max_blank_lines)[0])
    if steps.pii:
        replaced: Counter = Counter()

        def scrub(text: str) -> str:
            new, counts = scrub_pii(text, steps.pii_kinds)
            replaced.update(counts)
            return new

        rows, report["pii"] = _rewrite(rows, scrub)
        report["pii"]["replaced"] = dict(sorted(replaced.items()))
    kept, _, result = clean_texts([row_text(r) for r in rows],
                                  dataclasses.replace(steps, normalize=False, pii=False))
    for step in ("quality", "exact_dedup", "near_dedup"):
        report[step] = {"removed": result.steps[step].removed}
    report["quality"]["by_check"] = dict(result.quality)
    report["near_dedup"]["groups"] = len(result.near_groups)
    report["near_dedup"]["rows_in_groups"] = sum(map(len, result.near_groups))
    report["removed_examples"] = [_removed(rows, i, reason, result.duplicate_of)
                                  for i, reason in sorted(result.removed.items())[:MAX_LISTED]]
    report["kept"] = len(kept)
    groups = None
    if steps.near_dedup != "off":
        groups = [g if g is not None else f"row {i}" for i, g in zip(kept, result.group_ids(kept))]
    return [rows[i] for i in kept], groups, report


def _removed(rows: list[Row], i: int, reason: str, duplicate_of: dict[int, int]) -> str:
    if i in duplicate_of:  # name the row it duplicates by its location, not its index
        reason = f"{reason.split(':', 1)[0]}: duplicate of {rows[duplicate_of[i]].source}"
    return f"{rows[i].source}: {reason}"


def _rewrite(rows: list[Row], fn: Callable[[str], str]) -> tuple[list[Row], dict]:
    out, changed = [], 0
    for row in rows:
        new = map_text(row, fn)
        changed += new is not row
        out.append(new)
    return out, {"changed": changed}
