"""The data pipeline `tunesmith prepare` runs and `tunesmith train` reuses:

    read sources (policy error|skip, weights) -> clean -> hold out task clusters -> split
      -> render labelled records (instruction templates) -> tokenise + mask -> pack
      -> Arrow datasets cached by fingerprint, and a report of what every step did

Rows stream from the sources into a `RowStore` (Arrow files on disk, `rowstore`), and every stage reads and
writes such files a chunk at a time, in `num_proc` processes where it pays: what a stage keeps in memory is a
chunk of rows and a few numbers per row (duplicate keys, indices, token lengths), never the corpus. The
tokenised examples are written as Arrow files that become the prepared `datasets` tables (memory-mapped).

The result is keyed by a fingerprint of everything that shapes it (files' sizes and modification times,
options, tokenizer, package version), so a second run on the same inputs loads the prepared Arrow tables
instead of recomputing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunesmith.config.objectives import OBJECTIVES
from tunesmith.data.arrow import TOKEN_COLUMNS
from tunesmith.data.arrow import schema as token_schema
from tunesmith.data.cache import SPLIT_NAMES, ExampleTable, TokenFiles, fingerprint, load_cached, save_cached
from tunesmith.data.clean import CleanSteps
from tunesmith.data.formats import Row, iter_rows
from tunesmith.data.pack import pack_blocks, pack_examples, packing_efficiency
from tunesmith.data.render import hold_out_clusters, render_tasks
from tunesmith.data.rowclean import clean_store
from tunesmith.data.rowstore import (
    RowStore,
    file_rows,
    read_batches,
    read_column,
    run_jobs,
    take,
    values_at,
    write_rows,
)
from tunesmith.data.split import split_arrays, stratum_codes
from tunesmith.data.templates import end_of_turn_marker
from tunesmith.data.tokenize import CHAT_KINDS, Example, encode_rows, example_length, fit_row, length_stats
from tunesmith.errors import DataError

log = logging.getLogger(__name__)

MAX_LISTED_ERRORS = 20


@dataclass(frozen=True)
class Source:
    path: str
    format: str = "auto"
    weight: float = 1.0
    fields: tuple[tuple[str, str], ...] = ()  # (internal name, name in the file)
    text_unit: str = "file"
    task: str | None = None  # labelled records of this task type, rendered by instruction templates


@dataclass(frozen=True)
class InstructOptions:
    templates: tuple[str, ...] = ()  # user YAML files
    template_ids: tuple[str, ...] = ()  # empty: all
    inverted: bool = True
    shots: int = 0
    fewshot_format: str = "chat"
    cot: bool = False
    held_out_clusters: tuple[str, ...] = ()  # task clusters kept out of training: all their rows go to test


@dataclass(frozen=True)
class Options:
    """Everything besides the sources and the tokenizer that shapes the prepared data."""

    system_prompt: str | None = None
    on_error: str = "error"
    max_seq_len: int = 1024
    truncation: str = "right"
    train_on_prompt: bool = False
    pack: bool = False
    objective: str = "sft"  # a raw-text objective (clm) packs into fixed blocks, others into best-fit sequences
    validation: float = 0.0
    test: float = 0.0
    stratify_by: str | None = None
    seed: int = 0
    num_proc: int = 1
    instruct: InstructOptions = InstructOptions()


@dataclass
class Prepared:
    splits: dict[str, Sequence[Example]]
    report: dict[str, Any]
    fingerprint: str


# ---------------------------------------------------------------------------------------------------
# Reading


@dataclass
class ReadReport:
    rows_read: int = 0
    rows_kept: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, verbatim


def read_sources(sources: Sequence[Source], options: Options) -> tuple[list[Row], dict[str, dict]]:
    """Rows of every source, with its weight applied, in a list; returns them and a report per source."""
    reports: dict[str, dict] = {}
    return list(iter_sources(sources, options, reports)), reports


def read_store(sources: Sequence[Source], options: Options, directory: Path) -> tuple[RowStore, dict[str, dict]]:
    """`read_sources` streamed into a row store on disk."""
    reports: dict[str, dict] = {}
    return write_rows(iter_sources(sources, options, reports), directory, "rows"), reports


def iter_sources(sources: Sequence[Source], options: Options, reports: dict[str, dict]) -> Iterator[Row]:
    """Rows of every source, with its weight applied; each source's report is put in `reports` once it is read."""
    for source in sources:
        report = ReadReport()
        rng = random.Random(f"{options.seed}:{source.path}")

        def skip(where: str, exc: DataError, report: ReadReport = report) -> None:
            report.skipped += 1
            if len(report.errors) < MAX_LISTED_ERRORS:
                report.errors.append(str(exc))

        handler = skip if options.on_error == "skip" else None
        for row in iter_rows(source.path, source.format, options.system_prompt, dict(source.fields),
                             source.text_unit, on_error=handler, task=source.task):
            report.rows_read += 1
            copies = _copies(source.weight, rng)
            for _ in range(copies):
                yield row
            report.rows_kept += copies
        if report.rows_read == 0:
            if report.skipped:
                raise DataError(f"{source.path}: no usable rows ({report.skipped} skipped; first: {report.errors[0]})")
            raise DataError(f"{source.path}: no examples (the file is empty)")
        reports[source.path] = dataclasses.asdict(report)


def _copies(weight: float, rng: random.Random) -> int:
    """How many times a row is taken: the integer part of the weight, plus one more with the fraction's odds."""
    whole = int(weight)
    return whole + (1 if rng.random() < weight - whole else 0)


# ---------------------------------------------------------------------------------------------------
# Tokenising (a file of rows at a time, in parallel) and packing


def _tokenize_batch(rows: Sequence[Row], tokenizer, options: Options) -> dict[str, list]:
    """Rows -> ids, labels and what happened to each (kept / truncated / dropped), as columns."""
    out: dict[str, list] = {name: [] for name in TOKEN_COLUMNS}
    for row, encoded in zip(rows, encode_rows(tokenizer, rows, options.train_on_prompt)):
        if isinstance(encoded, DataError):
            raise encoded
        example = fit_row(row, encoded, options.max_seq_len, options.truncation)
        dropped = example is None
        example = Example([], [], row.source) if dropped else example
        for name in ("input_ids", "labels", "source", "rejected_ids", "rejected_labels", "desirable"):
            out[name].append(getattr(example, name))
        out["truncated"].append(max(len(ids) for ids in encoded[::2]) > options.max_seq_len)
        out["dropped"].append(dropped)
        out["length"].append(example_length(example))
        out["loss_tokens"].append(example.num_loss_tokens)
    return out


@dataclass
class _TokenizedFile:
    """One file of rows tokenised: its kept examples' file (None when none was kept) and what happened."""

    path: Path | None
    lengths: list[int] = field(default_factory=list)  # tokens of each kept example
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)  # the first few
    kinds: set[str] = field(default_factory=set)  # "preference" / "unpaired": some kept example is one

    def count(self, batch: dict[str, list], kept: list[int]) -> None:
        """Add a `_tokenize_batch` result whose rows at `kept` were kept."""
        self.lengths += [batch["length"][i] for i in kept]
        self.loss_tokens += sum(batch["loss_tokens"][i] for i in kept)
        self.truncated += sum(batch["truncated"])
        self.dropped += len(batch["dropped"]) - len(kept)
        dropped = [source for source, d in zip(batch["source"], batch["dropped"]) if d]
        self.dropped_sources += dropped[: 10 - len(self.dropped_sources)]
        self.kinds |= {"preference" for i in kept if batch["rejected_ids"][i] is not None}
        self.kinds |= {"unpaired" for i in kept if batch["desirable"][i] is not None}


def tokenize(store: RowStore, tokenizer, options: Options, directory: Path) -> tuple[TokenFiles | list, dict]:
    """Tokenise every row (a file at a time, in `options.num_proc` processes); count truncated and dropped rows.

    Args:
        directory: where the Arrow files of the kept examples go, one per file of rows.
    Returns:
        The kept examples' files (an empty list when no row gives an example) and a report.
    """
    num_rows = len(store)
    if not num_rows:
        return [], {"rows": 0, "examples": 0}
    if store.all_kinds() & set(CHAT_KINDS):  # check_template, on the kinds the store holds
        end_of_turn_marker(tokenizer)
    # Preference and unpaired columns are kept only when some kept example has them.
    columns = _example_columns(store.all_kinds() & {"preference", "unpaired"})
    directory.mkdir(parents=True, exist_ok=True)
    job = functools.partial(_tokenize_file, tokenizer=tokenizer, options=options, columns=columns,
                            directory=directory)
    parts = list(run_jobs(job, list(enumerate(store.files)), options.num_proc))
    lengths = np.array([n for p in parts for n in p.lengths], dtype=np.int64)
    dropped_sources = [s for p in parts for s in p.dropped_sources][:10]
    report = {
        "rows": num_rows,
        "examples": len(lengths),
        "truncated": sum(p.truncated for p in parts),
        "dropped_no_loss_tokens": sum(p.dropped for p in parts),
        "dropped_sources": dropped_sources,
        "tokens": int(lengths.sum()),
        "loss_tokens": sum(p.loss_tokens for p in parts),
        "length": length_stats(lengths.tolist()),
        "length_histogram": length_histogram(lengths),
    }
    files = [p.path for p in parts if p.path is not None]
    if not files:
        return [], report
    kept_columns = _example_columns(set().union(*(p.kinds for p in parts)))
    if kept_columns != columns:  # every row of some kind was dropped: its columns go
        files = [_select_columns(path, kept_columns) for path in files]
    return TokenFiles(files, kept_columns), report


def _example_columns(kinds: set[str]) -> list[str]:
    """The example columns kept for rows of the given kinds (besides chat, text and completion rows)."""
    return (["input_ids", "labels", "source"] + (["rejected_ids", "rejected_labels"] if "preference" in kinds else [])
            + (["desirable"] if "unpaired" in kinds else []))


def _tokenize_file(task: tuple[int, Path], tokenizer, options: Options, columns: list[str],
                   directory: Path) -> _TokenizedFile:
    """Tokenise one file of rows (in a worker); only the kept examples are written, as `columns`."""
    index, path = task
    out = _TokenizedFile(directory / f"tokens-{index:05d}.arrow")
    schema = token_schema(columns)
    with pa.ipc.new_stream(str(out.path), schema) as sink:
        for rows in file_rows(path):
            batch = _tokenize_batch(rows, tokenizer, options)
            kept = [i for i, dropped in enumerate(batch["dropped"]) if not dropped]
            out.count(batch, kept)
            if kept:
                sink.write_batch(pa.RecordBatch.from_pydict({c: [batch[c][i] for i in kept] for c in columns},
                                                            schema=schema))
    if not out.lengths:
        out.path.unlink()
        out.path = None
    return out


def _select_columns(path: Path, columns: list[str]) -> Path:
    target = path.with_suffix(".selected.arrow")
    schema = token_schema(columns)
    with pa.ipc.new_stream(str(target), schema) as sink:
        for batch in read_batches(path, columns):
            sink.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
    return target


def length_histogram(lengths: np.ndarray, bins: int = 40) -> dict[str, list]:
    if not len(lengths):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(lengths, bins=bins)
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


def pack(examples: list[Example], options: Options) -> tuple[list[Example], dict[str, Any]]:
    if not options.pack or not examples:
        return examples, {}
    if OBJECTIVES[options.objective].data == "text":  # a raw corpus: fixed blocks across documents
        packed = pack_blocks(examples, options.max_seq_len)
    else:
        packed = pack_examples(examples, options.max_seq_len)
    report = {"sequences": len(packed), "documents": len(examples),
              "efficiency": round(packing_efficiency(packed, options.max_seq_len), 4)}
    return packed, report


# ---------------------------------------------------------------------------------------------------
# The whole pipeline


def prepare(
    tokenizer,
    sources: dict[str, Sequence[Source]],
    options: Options,
    cache_dir: Path | None = None,
    clean: CleanSteps | None = None,
    load: bool = True,
) -> Prepared:
    """Run the pipeline (or load its cached result) for the sources of each split.

    Args:
        sources: split name -> sources; "validation"/"test" may be empty, then `options.validation` /
            `options.test` rows are split off the training rows, keeping near-duplicate groups whole.
        cache_dir: where the prepared tables are kept (memory-mapped when loaded); None: the examples are
            returned in memory, and the pipeline's working files go to a temporary folder.
        clean: the cleaning steps, run on each split's rows before splitting; None: no cleaning.
        load: False: with a cache, the splits are written (or found) and left unopened, `splits` empty
            (`tunesmith prepare` only reports them, without importing `datasets`).
    """
    key = fingerprint(tokenizer, sources, options, clean)
    if cache_dir is not None and (cached := load_cached(cache_dir / key, load)) is not None:
        log.info("prepared data loaded from the cache (%s)", cache_dir / key)
        return Prepared(cached[0], cached[1], key)
    report: dict[str, Any] = {"fingerprint": key, "sources": {}, "splits": {}}
    with _work_dir(cache_dir, key) as work:
        stores = {}
        for name in SPLIT_NAMES:
            stores[name], report["sources"][name] = read_store(sources.get(name, ()), options, work / "read" / name)
        groups = None
        if clean is not None:
            report["clean"] = {}
            for name in SPLIT_NAMES:
                if len(stores[name]):
                    stores[name], split_groups, report["clean"][name] = clean_store(
                        stores[name], clean, work / "clean" / name, options.num_proc)
                    groups = split_groups if name == "train" else groups
        if options.instruct.held_out_clusters:
            stores, groups = hold_out_clusters(stores, groups, options, report, work / "held-out")
        stores.update(_split_off(stores, groups, options, report, work / "split"))
        if any("task" in store.all_kinds() for store in stores.values()):
            stores = render_tasks(stores, options, work / "render")
        splits: dict[str, Any] = {}
        for name in SPLIT_NAMES:
            # pop: a split's rows are not needed once its examples are written
            tokens, report["splits"][name] = tokenize(stores.pop(name), tokenizer, options, work / "tokens" / name)
            if tokens and options.pack and name != "test":
                examples = ExampleTable(tokens.dataset(in_memory=cache_dir is None))
                splits[name], report["splits"][name]["packing"] = pack(examples, options)
            elif tokens and cache_dir is None:
                splits[name] = ExampleTable(tokens.dataset(in_memory=True))
            else:
                splits[name] = tokens  # with a cache: saved by moving its files, not by copying the table
        if cache_dir is not None:
            save_cached(cache_dir / key, splits, report)
    if cache_dir is not None:
        splits = load_cached(cache_dir / key, load)[0]
    return Prepared(splits, report, key)


@contextlib.contextmanager
def _work_dir(cache_dir: Path | None, key: str) -> Iterator[Path]:
    """A folder for the pipeline's working files, removed afterwards: next to the cache (so that the prepared
    tables are moved into it, not copied), or a temporary one."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="tunesmith-prepare-") as tmp:
            yield Path(tmp)
        return
    work = cache_dir / f"{key}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _split_off(stores: dict[str, RowStore], groups: np.ndarray | None, options: Options, report: dict,
               directory: Path) -> dict[str, RowStore]:
    wanted = {name: getattr(options, name) for name in ("validation", "test") if getattr(options, name)}
    wanted = {name: size for name, size in wanted.items() if not len(stores[name])}  # files given: nothing split off
    if not wanted:
        return {}
    train = stores["train"]
    strata = _strata(train, options.stratify_by) if options.stratify_by else None
    parts = split_arrays(len(train), wanted.get("validation", 0), wanted.get("test", 0), options.seed, strata,
                         groups)
    report["split"] = {name: len(parts[name]) for name in parts}
    return {name: take(train, parts[name], directory, name) for name in SPLIT_NAMES
            if name == "train" or name in wanted}


def _strata(store: RowStore, by: str) -> np.ndarray:
    """(N,) stratum code of each row (`split.stratum_codes`): its label, or else its task (or its kind)."""
    if by == "label":
        values = read_column(store, "label")
        if values.null_count:
            first = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
            source = values_at(store, "source", [first])[first]
            raise DataError(f"{source}: data.split.stratify_by=label, but the row has no label")
    else:
        task = read_column(store, "task")
        values = pc.if_else(pc.fill_null(pc.not_equal(task, ""), False), task, read_column(store, "kind"))
    encoded = values.combine_chunks().dictionary_encode()
    return stratum_codes(encoded.dictionary.to_pylist())[encoded.indices.to_numpy(zero_copy_only=False)]
