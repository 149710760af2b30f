"""Read the files people have, one record at a time, each with the place it came from.

    for where, record in iter_records("data/*.csv"):   # where = "data/a.csv:12"
        ...

Supported: JSON Lines (.jsonl, .ndjson), JSON (an array of objects or an object of columns), CSV and TSV,
Parquet, plain text (.txt, .md: one document per file or per line), folders of those, globs, and directories
written by `datasets.save_to_disk`. Every reader streams except JSON, whose format has no record boundaries.
A location is `file:line` for line-based formats, `file:line [i]` for the i-th item (0-based) of a JSON array,
and `file:row N` (0-based) for columnar ones.

A record that cannot be read (invalid JSON, bad UTF-8, a CSV row with the wrong number of fields) is yielded as
a `DataError` in place of the record, so a caller with a skip policy can count it and read on; problems with a
whole file (missing, unsupported, not a JSON array) are raised.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from tunesmith.errors import DataError
from tunesmith.paths import JSONL, SUFFIXES, TEXT, is_saved_dataset, resolve_paths

Record = dict[str, Any]


def iter_records(pattern: str, text_unit: str = "file") -> Iterator[tuple[str, Record | DataError]]:
    """(location, record or the DataError that stopped it being read) for every record `pattern` names.

    Args:
        text_unit: for plain text files, "file" (one document per file) or "line" (one per non-blank line);
            text records are `{"text": ...}`.
    """
    for path in resolve_paths(pattern):
        yield from _reader(path, text_unit)


def _reader(path: Path, text_unit: str) -> Iterator[tuple[str, Record]]:
    if is_saved_dataset(path):
        return _saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix in JSONL:
        return ((f"{path}:{n}", obj) for n, obj in _jsonl(path))
    if suffix == ".json":
        return _json(path)
    if suffix in (".csv", ".tsv"):
        return _csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _parquet(path)
    if suffix in TEXT:
        return _text(path, text_unit)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'} (supported: {', '.join(SUFFIXES)})")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Record]]:
    """Yield (line number, object) for each non-blank line; invalid JSON or UTF-8 raises, naming the line."""
    for lineno, obj in _jsonl(Path(path)):
        if isinstance(obj, DataError):
            raise obj
        yield lineno, obj


def _jsonl(path: Path) -> Iterator[tuple[int, Record | DataError]]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors)
                raw = raw[3:]
            try:
                line = _decode(raw, f"{path}:{lineno}")
            except DataError as exc:
                yield lineno, exc
                continue
            if not line.strip():
                continue
            yield lineno, _json_object(line, f"{path}:{lineno}")


def _json_object(line: str, where: str) -> Record | DataError:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(obj, dict):
        hint = " (JSON Lines: one object per line, not an array)" if isinstance(obj, list) else ""
        return DataError(f"{where}: expected a JSON object, got {type(obj).__name__}{hint}")
    return obj


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: invalid UTF-8 at byte {exc.start}") from None


def _json(path: Path) -> Iterator[tuple[str, Record]]:
    """An array of objects (each located by its line), or an object of equal-length columns."""
    text = _decode(path.read_bytes(), str(path)).lstrip("\ufeff")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "{":
        try:
            columns = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield from _columns(path, columns)
        return
    if text[start : start + 1] != "[":
        raise DataError(f"{path}:1: expected a JSON array of objects or an object of columns")
    pos = start + 1
    index = 0
    while True:
        pos = _skip_space(text, pos)
        if text[pos : pos + 1] == "]":
            end = _skip_space(text, pos + 1)
            if end < len(text):  # e.g. a second array appended: its records would be lost without a word
                line = text.count("\n", 0, end) + 1
                raise DataError(f"{path}:{line}: invalid JSON: extra data after the array (one JSON array per file; "
                                "use JSON Lines for appended records)")
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        where = f"{path}:{line} [{index}]"  # the item too: an array on one line puts every record on line 1
        if not isinstance(obj, dict):
            obj = DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj
        index += 1
        pos = _skip_space(text, pos)
        if text[pos : pos + 1] == ",":
            pos += 1
        elif text[pos : pos + 1] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{line}: invalid JSON: expected ',' or ']' after item {index - 1}")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _columns(path: Path, columns: Any) -> Iterator[tuple[str, Record]]:
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise DataError(f"{path}: a JSON object must map column names to lists of values")
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: columns have different lengths: {lengths}")
    for i in range(next(iter(lengths.values()), 0)):
        yield f"{path}:row {i}", {k: v[i] for k, v in columns.items()}


def _csv(path: Path, delimiter: str) -> Iterator[tuple[str, Record]]:
    """Header row first; empty cells become None. Locations are the line a record starts on."""
    with path.open("rb") as raw:
        for n, line in enumerate(raw, start=1):  # CSV has no byte-level error location: check UTF-8 first
            _decode(line, f"{path}:{n}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield where, DataError(f"{where}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}")
                continue
            yield where, {k: (v if v != "" else None) for k, v in zip(header, row)}


def _parquet(path: Path) -> Iterator[tuple[str, Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    index = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path}:row {index}", record
            index += 1


def _text(path: Path, unit: str) -> Iterator[tuple[str, Record]]:
    text = _decode(path.read_bytes(), str(path)).lstrip("\ufeff")
    if unit == "file":
        if text.strip():
            yield f"{path}:1", {"text": text}
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield f"{path}:{n}", {"text": line}


def _saved_dataset(path: Path) -> Iterator[tuple[str, Record]]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a saved DatasetDict without a 'train' split (has {', '.join(dataset)})")
        dataset = dataset["train"]
    for i, record in enumerate(dataset):
        yield f"{path}:row {i}", record
