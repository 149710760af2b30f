"""The prepared data on disk: the fingerprint that keys it, and the tables `prepare` saves and loads.

A prepared split is a folder that `datasets.load_from_disk` reads; its examples are read one at a time through
`ExampleTable`, memory-mapped, so a prepared corpus is never loaded whole.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tunesmith import __version__
from tunesmith.data.arrow import write_dataset_info
from tunesmith.data.tokenize import Example
from tunesmith.paths import resolve_paths

if TYPE_CHECKING:
    from tunesmith.data.clean import CleanSteps
    from tunesmith.data.pipeline import Options, Source

SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class TokenFiles:
    """Tokenised examples in Arrow files that `datasets` reads (`Dataset.from_file`), in order."""

    files: list[Path]
    columns: list[str]  # of data.arrow.TOKEN_COLUMNS, what the files hold

    def dataset(self, in_memory: bool):
        from datasets import Dataset, concatenate_datasets

        return concatenate_datasets([Dataset.from_file(str(path), in_memory=in_memory) for path in self.files])


def fingerprint(tokenizer, sources: dict[str, Sequence[Source]], options: Options,
                clean: CleanSteps | None = None) -> str:
    """A digest of everything that shapes the prepared data."""
    files = {}
    for name, split_sources in sources.items():
        for source in split_sources:
            for path in resolve_paths(source.path):
                stat = path.stat()
                files[str(path)] = [stat.st_size, stat.st_mtime_ns]
    parts = {
        "version": __version__,
        "code": _code_digest(),
        "sources": {k: [dataclasses.asdict(s) for s in v] for k, v in sources.items()},
        "files": files,
        "options": dataclasses.asdict(options),
        "clean": dataclasses.asdict(clean) if clean is not None else None,
        "tokenizer": _tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The data code itself: a cache written by other code (an upgrade, a local change) is never reused."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*")):
        if path.suffix in (".py", ".yaml"):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    """What decides the ids: the Rust tokenizer's whole pipeline (normalizer, pre-tokenizer, model, added tokens,
    post-processor) where there is one, else the class and vocabulary, plus the template and special tokens. The
    same for transformers' tokenizer and the light one of `prepare` (model/light_tokenizer.py), so `train` finds
    the data `prepare` wrote."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        for option in ("padding", "truncation"):  # per call, and set by whichever call came last
            pipeline.pop(option, None)
    else:
        pipeline = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())]
    state = json.dumps({"pipeline": pipeline, "template": tokenizer.chat_template,
                        "special": sorted(tokenizer.all_special_tokens)})
    return hashlib.sha256(state.encode()).hexdigest()


def save_cached(path: Path, splits: dict[str, Any], report: dict) -> None:
    """Arrow tables per split + the report, written to a temporary name and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, examples in splits.items():
        if isinstance(examples, TokenFiles):
            _save_token_files(examples, tmp / name, f"{path.name}-{name}")
        elif len(examples):  # an empty Arrow table does not load back; a missing split reads as empty
            _as_table(examples).save_to_disk(str(tmp / name))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _save_token_files(tokens: TokenFiles, directory: Path, fingerprint: str) -> None:
    """The token files moved into a folder that `datasets.load_from_disk` reads: the layout
    `Dataset.save_to_disk` writes (its shards, `dataset_info.json`, and `state.json` naming the shards),
    without reading the tables through memory as `save_to_disk` would."""
    directory.mkdir()
    names = [f"data-{i:05d}-of-{len(tokens.files):05d}.arrow" for i in range(len(tokens.files))]
    for source, name in zip(tokens.files, names):
        source.rename(directory / name)
    write_dataset_info(directory, tokens.columns)
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def _as_table(examples: Sequence[Example]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
                              "source": [e.source for e in examples],
                              "position_ids": [e.position_ids for e in examples]})


def load_cached(path: Path, load: bool = True) -> tuple[dict[str, Sequence[Example]], dict] | None:
    """The splits saved in `path` (memory-mapped; none when not `load`) and their report; None when not saved."""
    if not (path / "report.json").is_file():
        return None
    if not load:
        return {}, json.loads((path / "report.json").read_text())
    from datasets import load_from_disk

    splits = {name: ExampleTable(load_from_disk(str(path / name))) if (path / name).is_dir() else []
              for name in SPLIT_NAMES}
    return splits, json.loads((path / "report.json").read_text())


class ExampleTable(Sequence[Example]):
    """A memory-mapped Arrow table of examples, read one at a time."""

    def __init__(self, table) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.table[int(index)]
        return Example(row["input_ids"], row["labels"], row["source"], row.get("position_ids"),
                       row.get("rejected_ids"), row.get("rejected_labels"), row.get("desirable"), row.get("ref_logps"))
