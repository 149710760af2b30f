"""Where things are: the data files a pattern names (checked by the config layer before a run, read by the data
layer), and where tunesmith keeps what it computes once (prepared data, converted GGUF models, the llama.cpp
build): $TUNESMITH_CACHE, by default ~/.cache/tunesmith. The lowest layer, so every package can ask it."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from tunesmith.errors import DataError

JSONL = (".jsonl", ".ndjson")
TEXT = (".txt", ".md", ".text")
SUFFIXES = JSONL + TEXT + (".json", ".csv", ".tsv", ".parquet")


def cache_home() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith")


def resolve_paths(pattern: str) -> list[Path]:
    """A file, a folder (its data files, recursively, sorted) or a glob; an empty match is an error."""
    path = Path(pattern)
    if is_saved_dataset(path):
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{pattern}: the folder holds no data files ({', '.join(SUFFIXES)})")
        return files
    if path.is_file():
        return [path]
    if any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{pattern}: no file matches")
        return files
    raise DataError(f"{pattern}: data file not found")


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets` (`Dataset.save_to_disk` or `DatasetDict.save_to_disk`)."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())
