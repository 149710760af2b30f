"""Rows on disk: the data pipeline's working table, so that no stage holds the whole corpus in memory.

    with RowWriter(work / "read", "rows") as writer:
        for row in rows:
            writer.add(row)
    store = writer.store                       # Arrow files of at most CHUNK rows
    for rows in file_rows(store.files[0]):     # back as `Row`s, BATCH at a time
        ...
    kept = take(store, np.array([0, 5, 9]), work / "kept", "kept")

A `RowStore` is a list of Arrow IPC stream files of at most CHUNK rows each, written in record batches of
BATCH rows and read back one batch at a time with plain reads. Not memory maps: every page of a mapped file
that a pass touches stays in the process's resident memory until the map is closed, so one pass over a
mapped table grows the process by the table's size. A labelled record (`Row.record`, any Python values a
Parquet file or a saved dataset may hold) is stored pickled, so it comes back exactly as it was read.

Stages run a job per file, in order, in `num_proc` forked processes (`run_jobs`); choosing rows (`take`) and
joining stores (`concat`) reuse whole files where they can.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tunesmith.data.formats import Row

CHUNK = 5_000  # rows per file: the unit of work of a parallel pass
BATCH = 1_000  # rows per record batch: what a pass holds as Python objects at once

_TEXT = pa.string()
ROW_SCHEMA = pa.schema([
    ("source", _TEXT), ("kind", _TEXT), ("messages", pa.list_(pa.struct([("role", _TEXT), ("content", _TEXT)]))),
    ("text", _TEXT), ("prompt", _TEXT), ("completion", _TEXT), ("label", _TEXT), ("chosen", _TEXT),
    ("rejected", _TEXT), ("desirable", pa.bool_()), ("task", _TEXT), ("record", pa.binary()),
])
_FIELDS = [f.name for f in dataclasses.fields(Row)]


@dataclass
class RowStore:
    """Rows in Arrow files, in order: the rows of files[0], then of files[1] ..."""

    files: list[Path] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # rows per file
    kinds: list[frozenset[str]] = field(default_factory=list)  # the `Row.kind`s in each file

    def __len__(self) -> int:
        return sum(self.lengths)

    def all_kinds(self) -> set[str]:
        return set().union(*self.kinds)

    def offsets(self) -> np.ndarray:
        """(files + 1,) the position of each file's first row, and the number of rows."""
        return np.concatenate(([0], np.cumsum(self.lengths, dtype=np.int64)))

    def append(self, path: Path, length: int, kinds: frozenset[str]) -> None:
        self.files.append(path)
        self.lengths.append(length)
        self.kinds.append(kinds)


def concat(*stores: RowStore) -> RowStore:
    """The rows of each store, one store after the other (no data is copied)."""
    out = RowStore()
    for store in stores:
        for part in zip(store.files, store.lengths, store.kinds):
            out.append(*part)
    return out


# ---------------------------------------------------------------------------------------------------
# Rows <-> Arrow


def rows_to_batch(rows: Sequence[Row]) -> pa.RecordBatch:
    columns: dict[str, list] = {name: [getattr(r, name) for r in rows] for name in _FIELDS}
    columns["messages"] = [list(m) for m in columns["messages"]]
    columns["record"] = [None if r is None else pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)
                         for r in columns["record"]]
    columns["kind"] = [r.kind for r in rows]
    return pa.RecordBatch.from_pydict(columns, schema=ROW_SCHEMA)


def batch_to_rows(batch: pa.RecordBatch) -> list[Row]:
    columns = batch.select(_FIELDS).to_pydict()
    columns["messages"] = [tuple(m) for m in columns["messages"]]
    columns["record"] = [None if r is None else pickle.loads(r) for r in columns["record"]]
    return [Row(*values) for values in zip(*(columns[name] for name in _FIELDS))]


def read_batches(path: Path, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of one Arrow stream file, read (not mapped) one at a time."""
    with pa.OSFile(str(path)) as source:
        for batch in pa.ipc.open_stream(source):
            yield batch.select(columns) if columns is not None else batch


def file_rows(path: Path) -> Iterator[list[Row]]:
    """The rows of one file, a record batch at a time."""
    for batch in read_batches(path):
        yield batch_to_rows(batch)


def read_column(store: RowStore, name: str) -> pa.ChunkedArray:
    """One column of every row (the other columns are read and dropped a batch at a time)."""
    return pa.chunked_array([part for path in store.files for part in _file_column(path, name).chunks],
                            type=ROW_SCHEMA.field(name).type)


def _file_column(path: Path, name: str) -> pa.ChunkedArray:
    return pa.chunked_array([b.column(0) for b in read_batches(path, [name])], type=ROW_SCHEMA.field(name).type)


def values_at(store: RowStore, name: str, rows: Iterable[int]) -> dict[int, Any]:
    """Row -> its value in column `name`, for a few rows (only the files holding them are read)."""
    wanted = np.unique(np.fromiter(rows, dtype=np.int64))
    bounds = store.offsets()
    out = {}
    for f in np.unique(np.searchsorted(bounds, wanted, side="right") - 1):
        local = wanted[(wanted >= bounds[f]) & (wanted < bounds[f + 1])]
        out.update(zip(local.tolist(), _file_column(store.files[f], name).take(local - bounds[f]).to_pylist()))
    return out


# ---------------------------------------------------------------------------------------------------
# Writing and choosing rows


class RowWriter:
    """Rows added one at a time, written to `directory` as files of at most `chunk` rows (default CHUNK)."""

    def __init__(self, directory: Path, name: str, chunk: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.name, self.chunk = directory, name, chunk or CHUNK
        self.store = RowStore()
        self._rows: list[Row] = []
        self._sink: pa.ipc.RecordBatchStreamWriter | None = None
        self._in_file = 0
        self._kinds: set[str] = set()

    def add(self, row: Row) -> None:
        self._rows.append(row)
        if len(self._rows) >= min(BATCH, self.chunk - self._in_file):
            self._flush()

    def extend(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.add(row)

    def close(self) -> RowStore:
        self._flush()
        if self._sink is not None:
            self._sink.close()
            self.store.append(self._path(), self._in_file, frozenset(self._kinds))
            self._sink, self._in_file, self._kinds = None, 0, set()
        return self.store

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._sink is not None:  # the rows are not wanted: just release the file
            self._sink.close()

    def _path(self) -> Path:
        return self.directory / f"{self.name}-{len(self.store.files):05d}.arrow"

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._sink is None:
            self._sink = pa.ipc.new_stream(str(self._path()), ROW_SCHEMA)
        self._sink.write_batch(rows_to_batch(self._rows))
        self._in_file += len(self._rows)
        self._kinds.update(r.kind for r in self._rows)
        self._rows = []
        if self._in_file >= self.chunk:
            self.close()


def write_rows(rows: Iterable[Row], directory: Path, name: str) -> RowStore:
    with RowWriter(directory, name) as writer:
        writer.extend(rows)
    return writer.store


def take(store: RowStore, rows: np.ndarray, directory: Path, name: str) -> RowStore:
    """The rows at the given positions (ascending, distinct), in that order. A file whose rows are all chosen
    is reused as it is; the others are rewritten with the chosen rows (one file at a time in memory)."""
    out = RowStore()
    bounds = store.offsets()
    cuts = np.searchsorted(rows, bounds)
    directory.mkdir(parents=True, exist_ok=True)
    for f, path in enumerate(store.files):
        local = rows[cuts[f] : cuts[f + 1]] - bounds[f]
        if len(local) in (0, store.lengths[f]):
            if len(local):
                out.append(path, store.lengths[f], store.kinds[f])
            continue
        table = pa.Table.from_batches(list(read_batches(path)), schema=ROW_SCHEMA).take(local)
        target = directory / f"{name}-{f:05d}.arrow"
        with pa.ipc.new_stream(str(target), ROW_SCHEMA) as sink:
            sink.write_table(table, max_chunksize=BATCH)
        out.append(target, len(table), frozenset(table.column("kind").unique().to_pylist()))
    return out


# ---------------------------------------------------------------------------------------------------
# Running a job per file, in parallel

_JOB: Callable[[Any], Any] | None = None  # the job of the pool being run: forked workers inherit it


def _run_job(task: Any) -> Any:
    return _JOB(task)


def run_jobs(job: Callable[[Any], Any], tasks: Sequence[Any], num_proc: int) -> Iterator[Any]:
    """`job(task)` for each task, results in task order: in this process, or with `num_proc` > 1 and several
    tasks in as many forked processes. The job (and what it holds, such as a tokenizer) reaches the workers
    by the fork, not by pickling; tasks and results are pickled, so they should be small (paths, counts,
    arrays). A worker's exception is raised here, at its task's place in the order."""
    global _JOB
    if num_proc <= 1 or len(tasks) <= 1:
        yield from map(job, tasks)
        return
    if _JOB is not None:
        raise RuntimeError("run_jobs: a pass is already running (passes do not nest)")
    _JOB = job
    try:
        with multiprocessing.get_context("fork").Pool(min(num_proc, len(tasks))) as pool:
            yield from pool.imap(_run_job, tasks)
    finally:
        _JOB = None
