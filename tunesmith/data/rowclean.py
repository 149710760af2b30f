"""Cleaning applied to normalised rows: text steps on every field, filters and dedup on the whole row.

Normalisation and personal-data scrubbing rewrite each string a row holds (every message's content, the
prompt, the answers ...); quality filters and duplicate detection look at the row's text as a whole.

`clean_rows` cleans rows held in a list; `clean_store` cleans a `RowStore` on disk a file at a time (in
parallel), keeping per row only its exact-duplicate key and MinHash keys in memory (signatures stay on disk).
Both rewrite rows with `_Rewrite`, decide what survives with `clean.select_rows` and report with `_report`, so
they give the same rows and the same report.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tunesmith.data.clean import CleanReport, CleanSteps, Verdicts, quality_problems, select_rows, text_verdicts
from tunesmith.data.dedup import (
    Bands,
    band_keys,
    exact_keys,
    group_signatures,
    lsh_bands,
    minhash_signatures,
    signature_keys,
)
from tunesmith.data.formats import Row
from tunesmith.data.normalize import normalize_text
from tunesmith.data.pii import scrub_pii
from tunesmith.data.rowstore import ROW_SCHEMA, RowStore, file_rows, rows_to_batch, run_jobs, take, values_at

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
    rewrite = _Rewrite(steps)
    rows = [rewrite(row) for row in rows]
    result = CleanReport(len(rows))
    kept = select_rows(text_verdicts([row_text(r) for r in rows], steps), steps, result).tolist()
    report = {"rows": len(rows), **rewrite.report(), **_report(result, lambda at: {i: rows[i].source for i in at})}
    groups = None
    if steps.near_dedup != "off":
        groups = [g if g is not None else f"row {i}" for i, g in zip(kept, result.group_ids(kept))]
    return [rows[i] for i in kept], groups, report


def clean_store(store: RowStore, steps: CleanSteps, directory: Path,
                num_proc: int = 1) -> tuple[RowStore, np.ndarray | None, dict]:
    """`clean_rows` for rows on disk: each file is rewritten and its rows judged in a worker; the parent
    decides from the verdicts which rows survive and writes them to `directory`.

    Returns:
        the kept rows; (K,) int64 near-duplicate group of each kept row (rows in no group get a code of their
        own), or None when near-duplicate detection is off; and the report `clean_rows` gives.
    """
    bands = lsh_bands(steps.near_threshold, steps.num_perm) if steps.near_dedup != "off" else None
    job = functools.partial(_clean_file, steps=steps, bands=bands, directory=directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = list(run_jobs(job, list(enumerate(store.files)), num_proc))
    cleaned = RowStore([f.path for f in files], list(store.lengths), list(store.kinds))  # kinds do not change
    bounds = cleaned.offsets()
    rewrite = _Rewrite(steps)
    for f in files:
        rewrite.add(f.rewrite)
    near_groups = None
    if bands is not None:
        sigs = SignatureFiles([f.signatures for f in files], [f.bands for f in files], bounds, bands, steps.num_perm,
                              np.concatenate([f.signature_keys for f in files]),
                              np.concatenate([f.nonempty for f in files]))
        near_groups = functools.partial(group_signatures, sigs, threshold=steps.near_threshold)
    verdicts = Verdicts({int(bounds[n]) + i: p for n, f in enumerate(files) for i, p in f.problems.items()},
                        np.concatenate([f.exact_keys for f in files]) if steps.exact_dedup else None, near_groups)
    result = CleanReport(len(cleaned))
    kept = select_rows(verdicts, steps, result)
    report = {"rows": len(cleaned), **rewrite.report(),
              **_report(result, functools.partial(values_at, cleaned, "source"))}
    groups = _group_codes(result.near_groups, kept, len(cleaned)) if bands is not None else None
    return take(cleaned, kept, directory, "kept"), groups, report


class _Rewrite:
    """Normalisation, then personal-data scrubbing, of every string a row holds; counts the rows each changed
    and the placeholders inserted by kind."""

    def __init__(self, steps: CleanSteps) -> None:
        self.steps = steps
        self.normalized = 0
        self.scrubbed = 0
        self.replaced: Counter = Counter()

    def __call__(self, row: Row) -> Row:
        if self.steps.normalize:
            new = map_text(row, self._normalize)
            self.normalized += new is not row
            row = new
        if self.steps.pii:
            new = map_text(row, self._scrub)
            self.scrubbed += new is not row
            row = new
        return row

    def add(self, other: _Rewrite) -> None:
        self.normalized += other.normalized
        self.scrubbed += other.scrubbed
        self.replaced.update(other.replaced)

    def report(self) -> dict:
        out: dict[str, Any] = {}
        if self.steps.normalize:
            out["normalize"] = {"changed": self.normalized}
        if self.steps.pii:
            out["pii"] = {"changed": self.scrubbed, "replaced": dict(sorted(self.replaced.items()))}
        return out

    def _normalize(self, text: str) -> str:
        return normalize_text(text, self.steps.unicode_form, self.steps.max_blank_lines)[0]

    def _scrub(self, text: str) -> str:
        new, counts = scrub_pii(text, self.steps.pii_kinds)
        self.replaced.update(counts)
        return new


def _report(result: CleanReport, sources_of: Callable[[Iterable[int]], dict[int, str]]) -> dict:
    """What the filters and dedup removed; removed rows (the first few) and the rows they duplicate are named
    by their location, `sources_of(rows)` giving it."""
    report: dict[str, Any] = {step: {"removed": result.steps[step].removed}
                              for step in ("quality", "exact_dedup", "near_dedup")}
    report["quality"]["by_check"] = dict(result.quality)
    report["near_dedup"]["groups"] = len(result.near_groups)
    report["near_dedup"]["rows_in_groups"] = sum(map(len, result.near_groups))
    listed = sorted(result.removed.items())[:MAX_LISTED]
    sources = sources_of({i for i, _ in listed} | {result.duplicate_of[i] for i, _ in listed
                                                    if i in result.duplicate_of})
    report["removed_examples"] = [_removed(i, reason, result.duplicate_of, sources) for i, reason in listed]
    report["kept"] = result.num_kept
    return report


def _removed(i: int, reason: str, duplicate_of: dict[int, int], sources: dict[int, str]) -> str:
    if i in duplicate_of:  # name the row it duplicates by its location, not its index
        reason = f"{reason.split(':', 1)[0]}: duplicate of {sources[duplicate_of[i]]}"
    return f"{sources[i]}: {reason}"


def _group_codes(near_groups: list[list[int]], kept: np.ndarray, num_rows: int) -> np.ndarray:
    """(K,) the near-duplicate group of each kept row; a row in no group gets a code of its own."""
    group = np.full(num_rows, -1, dtype=np.int64)
    for g, members in enumerate(near_groups):
        group[members] = g
    codes = group[kept]
    alone = codes < 0
    codes[alone] = len(near_groups) + np.arange(int(alone.sum()))
    return codes


# ---------------------------------------------------------------------------------------------------
# One file of a store, in a worker


@dataclass
class _CleanedFile:
    """A file's rows rewritten, and the verdicts on them (rows counted from the file's first)."""

    path: Path
    rewrite: _Rewrite
    problems: dict[int, str] = field(default_factory=dict)
    exact_keys: np.ndarray | None = None  # (n, 2) uint64
    signatures: Path | None = None  # (n, num_perm) uint32 .npy
    bands: Path | None = None  # (bands, n) uint64 .npy
    signature_keys: np.ndarray | None = None  # (n,) uint64
    nonempty: np.ndarray | None = None  # (n,) bool


def _clean_file(task: tuple[int, Path], steps: CleanSteps, bands: Bands | None, directory: Path) -> _CleanedFile:
    index, path = task
    out = _CleanedFile(directory / f"clean-{index:05d}.arrow", _Rewrite(steps))
    keys, signatures, num_rows = [], [], 0
    with pa.ipc.new_stream(str(out.path), ROW_SCHEMA) as sink:
        for rows in file_rows(path):
            rows = [out.rewrite(row) for row in rows]
            sink.write_batch(rows_to_batch(rows))
            texts = [row_text(r) for r in rows]
            if steps.quality is not None:
                out.problems.update(quality_problems(texts, steps.quality, first=num_rows))
            if steps.exact_dedup:
                keys.append(exact_keys(texts))
            if bands is not None:
                signatures.append(minhash_signatures(texts, steps.shingle, steps.ngram, steps.num_perm, steps.seed))
            num_rows += len(rows)
    if steps.exact_dedup:
        out.exact_keys = np.concatenate(keys)
    if bands is not None:
        sig = np.concatenate(signatures)
        out.signatures, out.bands = directory / f"signatures-{index:05d}.npy", directory / f"bands-{index:05d}.npy"
        np.save(out.signatures, sig)
        np.save(out.bands, band_keys(sig, bands))
        out.signature_keys, out.nonempty = signature_keys(sig), (sig != np.uint32(0xFFFFFFFF)).any(axis=1)
    return out


class SignatureFiles:
    """`dedup.Signatures` saved a file per chunk of rows; only the per-row keys are held in memory, and a
    band or a few signatures are read when grouping asks for them."""

    def __init__(self, signatures: list[Path], bands_files: list[Path], bounds: np.ndarray, bands: Bands,
                 num_perm: int, keys: np.ndarray, nonempty: np.ndarray) -> None:
        self.signature_files, self.band_files, self.bounds = signatures, bands_files, bounds
        self.bands, self.num_perm, self.keys, self.nonempty = bands, num_perm, keys, nonempty

    def band(self, k: int, rows: np.ndarray) -> np.ndarray:
        return np.concatenate([np.load(path, mmap_mode="r")[k] for path in self.band_files])[rows]

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.num_perm), dtype=np.uint32)
        if not len(rows):
            return out
        file_of = np.searchsorted(self.bounds, rows, side="right") - 1
        order = np.argsort(file_of, kind="stable")
        for part in np.split(order, np.flatnonzero(np.diff(file_of[order])) + 1):
            f = file_of[part[0]]
            signatures = np.load(self.signature_files[f], mmap_mode="r")  # mapped: only these rows are read
            out[part] = signatures[rows[part] - self.bounds[f]]
            del signatures  # unmapped, so the pages read leave this process's memory
        return out
