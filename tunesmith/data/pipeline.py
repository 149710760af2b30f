"""The data pipeline `tunesmith prepare` runs and `tunesmith train` reuses:

    read sources (policy error|skip, weights) -> clean -> split -> tokenise + mask (datasets.map, num_proc)
      -> pack -> Arrow datasets cached by fingerprint, and a report of what every step did

The result is keyed by a fingerprint of everything that shapes it (files' sizes and modification times,
options, tokenizer, package version), so a second run on the same inputs loads the prepared Arrow tables
instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tunesmith import __version__
from tunesmith.data.clean import CleanSteps
from tunesmith.data.formats import Row, iter_rows
from tunesmith.data.rowclean import clean_rows
from tunesmith.data.pack import pack_blocks, pack_examples, packing_efficiency
from tunesmith.data.sources import resolve_paths
from tunesmith.data.split import split_indices
from tunesmith.data.tokenize import Example, check_template, encode_rows, example_length, fit_row, length_stats
from tunesmith.errors import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
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
    objective: str = "sft"  # clm packs into fixed blocks, sft into best-fit sequences
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
    """Rows of every source, with its weight applied; returns them and a report per source."""
    rows: list[Row] = []
    reports = {}
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
            rows += [row] * copies
            report.rows_kept += copies
        if report.rows_read == 0:
            if report.skipped:
                raise DataError(f"{source.path}: no usable rows ({report.skipped} skipped; first: {report.errors[0]})")
            raise DataError(f"{source.path}: no examples (the file is empty)")
        reports[source.path] = dataclasses.asdict(report)
    return rows, reports


def _copies(weight: float, rng: random.Random) -> int:
    """How many times a row is taken: the integer part of the weight, plus one more with the fraction's odds."""
    whole = int(weight)
    return whole + (1 if rng.random() < weight - whole else 0)


# ---------------------------------------------------------------------------------------------------
# Tokenising (on datasets, in parallel) and packing


ROW_CHUNK = 20_000  # rows converted to Arrow at a time: bounds the conversion's transient memory


def _row_features():
    from datasets import Features, Value

    text = Value("string")
    return Features({"source": text, "messages": [{"role": text, "content": text}], "text": text, "prompt": text,
                     "completion": text, "label": text, "chosen": text, "rejected": text,
                     "desirable": Value("bool"), "task": text})


def _row_columns(rows: Sequence[Row]) -> dict[str, list]:
    """Rows as columns for Arrow, sharing the rows' strings (no deep copy as `dataclasses.asdict` makes).
    Labelled records were rendered into messages by now, so `record` is left out."""
    names = [f.name for f in dataclasses.fields(Row) if f.name != "record"]
    columns = {name: [getattr(r, name) for r in rows] for name in names}
    columns["messages"] = [list(m) for m in columns["messages"]]
    return columns


def _row_table(rows: list[Row], work_dir: Path | None):
    """The rows as one Arrow table, converted a chunk at a time (and consumed from `rows` as it goes); on disk
    and memory-mapped when `work_dir` is given, so tokenising workers share it instead of receiving copies."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    features, parts = _row_features(), []
    while rows:
        chunk = Dataset.from_dict(_row_columns(rows[:ROW_CHUNK]), features=features)
        del rows[:ROW_CHUNK]
        if work_dir is not None:
            chunk.save_to_disk(str(work_dir / f"rows-{len(parts)}"))
            chunk = load_from_disk(str(work_dir / f"rows-{len(parts)}"))
        parts.append(chunk)
    return concatenate_datasets(parts)


def _token_features():
    from datasets import Features, Sequence as ArrowList, Value

    ids = ArrowList(Value("int32"))
    return Features({"input_ids": ids, "labels": ids, "source": Value("string"), "rejected_ids": ids,
                     "rejected_labels": ids, "desirable": Value("bool"), "truncated": Value("bool"),
                     "dropped": Value("bool"), "length": Value("int64"), "loss_tokens": Value("int64")})


def _tokenize_batch(batch: dict[str, list], tokenizer, options: Options) -> dict[str, list]:
    """datasets.map function: rows -> ids, labels and what happened to each (kept / truncated / dropped)."""
    out: dict[str, list] = {name: [] for name in _token_features()}
    rows = [Row(**{k: batch[k][i] for k in batch}) for i in range(len(batch["source"]))]
    rows = [dataclasses.replace(row, messages=tuple(row.messages or ())) for row in rows]
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


def tokenize(rows: Sequence[Row], tokenizer, options: Options, work_file: Path | None = None):
    """Tokenise with `datasets.map` (batched, `num_proc` processes); count truncated and dropped rows.

    Args:
        work_file: where the Arrow table of token ids goes (memory-mapped afterwards); None keeps it in memory.
    Returns:
        The examples (an `ExampleTable` over the Arrow table, nothing copied into Python lists) and a report.
    """
    import numpy as np

    num_rows = len(rows)
    if not num_rows:
        return [], {"rows": 0, "examples": 0}
    check_template(tokenizer, rows)
    # Consumed in place: the caller hands over its rows (prepare pops them), freed as they become Arrow.
    table = _row_table(rows if isinstance(rows, list) else list(rows),
                       work_file.with_suffix(".rows") if work_file else None)
    table = table.map(_tokenize_batch, batched=True, batch_size=256, num_proc=_procs(options, num_rows),
                      remove_columns=table.column_names, features=_token_features(), fn_kwargs={"tokenizer": tokenizer, "options": options},
                      load_from_cache_file=False, desc="tokenise", keep_in_memory=work_file is None,
                      cache_file_name=str(work_file) if work_file else None)
    dropped = np.asarray(table["dropped"], dtype=bool)
    kept = np.flatnonzero(~dropped)
    lengths, loss_tokens = np.asarray(table["length"])[kept], np.asarray(table["loss_tokens"])[kept]
    report = {
        "rows": num_rows,
        "examples": len(kept),
        "truncated": int(np.sum(table["truncated"])),
        "dropped_no_loss_tokens": int(dropped.sum()),
        "dropped_sources": list(table.select(np.flatnonzero(dropped)[:10])["source"]) if dropped.any() else [],
        "tokens": int(lengths.sum()),
        "loss_tokens": int(loss_tokens.sum()),
        "length": length_stats(lengths.tolist()),
        "length_histogram": _histogram(lengths.tolist()),
    }
    # Preference and unpaired columns are kept only when some row has them.
    present = {name for name in ("rejected_ids", "desirable") if table.data.column(name).null_count < len(table)}
    examples = table.select_columns(["input_ids", "labels", "source", "dropped"]
                                    + (["rejected_ids", "rejected_labels"] if "rejected_ids" in present else [])
                                    + (["desirable"] if "desirable" in present else []))
    if dropped.any():  # filter (written to disk) rather than select: no index mapping to flatten in memory later
        examples = examples.filter(lambda flags: [not f for f in flags], input_columns="dropped", batched=True,
                                   keep_in_memory=work_file is None, desc="drop",
                                   cache_file_name=str(work_file.with_suffix(".kept.arrow")) if work_file else None)
    return ExampleTable(examples.remove_columns("dropped")), report


def _histogram(lengths: list[int], bins: int = 40) -> dict[str, list]:
    import numpy as np

    if not lengths:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(lengths, bins=bins)
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


def _procs(options: Options, num_rows: int) -> int | None:
    # Forking processes costs more than it saves on small inputs.
    return options.num_proc if options.num_proc > 1 and num_rows >= 2000 else None


def pack(examples: list[Example], options: Options) -> tuple[list[Example], dict[str, Any]]:
    if not options.pack or not examples:
        return examples, {}
    if options.objective == "clm":
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
) -> Prepared:
    """Run the pipeline (or load its cached result) for the sources of each split.

    Args:
        sources: split name -> sources; "validation"/"test" may be empty, then `options.validation` /
            `options.test` rows are split off the training rows, keeping near-duplicate groups whole.
        clean: the cleaning steps, run on each split's rows before splitting; None: no cleaning.
    """
    key = fingerprint(tokenizer, sources, options, clean)
    if cache_dir is not None and (cached := _load_cached(cache_dir / key)) is not None:
        log.info("prepared data loaded from the cache (%s)", cache_dir / key)
        return Prepared(cached[0], cached[1], key)
    report: dict[str, Any] = {"fingerprint": key, "sources": {}, "splits": {}}
    rows = {}
    for name in SPLIT_NAMES:
        rows[name], report["sources"][name] = read_sources(sources.get(name, ()), options)
    groups = None
    if clean is not None:
        report["clean"] = {}
        for name in SPLIT_NAMES:
            if rows[name]:
                # pop: clean_rows then holds the only reference, so rows it replaces are freed as it goes
                rows[name], split_groups, report["clean"][name] = clean_rows(rows.pop(name), clean)
                groups = split_groups if name == "train" else groups
    if options.instruct.held_out_clusters:
        rows = hold_out_clusters(rows, options, report)
    rows.update(_split_off(rows, groups, options, report))
    if any(r.kind == "task" for split in rows.values() for r in split):
        rows = render_tasks(rows, options)
    work = None
    if cache_dir is not None:
        work = cache_dir / f"{key}.work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    splits = {}
    for name in SPLIT_NAMES:
        # pop: the token table replaces the rows, which are freed once it is built
        examples, report["splits"][name] = tokenize(rows.pop(name), tokenizer, options,
                                                    work / f"{name}.arrow" if work else None)
        splits[name], packing = pack(examples, options) if name != "test" else (examples, {})
        if packing:
            report["splits"][name]["packing"] = packing
    if cache_dir is not None:
        _save_cached(cache_dir / key, splits, report)
        shutil.rmtree(work, ignore_errors=True)
        splits = _load_cached(cache_dir / key)[0]
    return Prepared(splits, report, key)


def _split_off(rows: dict[str, list[Row]], groups, options: Options, report: dict) -> dict[str, list[Row]]:
    wanted = {name: getattr(options, name) for name in ("validation", "test") if getattr(options, name)}
    wanted = {name: size for name, size in wanted.items() if not rows[name]}  # files given: nothing split off
    if not wanted:
        return {}
    train = rows["train"]
    strata = [_stratum(r, options.stratify_by) for r in train] if options.stratify_by else None
    parts = split_indices(len(train), wanted.get("validation", 0), wanted.get("test", 0), options.seed, strata,
                          groups)
    report["split"] = {name: len(parts[name]) for name in parts}
    return {name: [train[i] for i in parts[name]] for name in SPLIT_NAMES if name == "train" or name in wanted}


def _task_types(options: Options):
    from tunesmith.data.instruct import builtin_tasks, load_tasks

    return load_tasks(options.instruct.templates) if options.instruct.templates else builtin_tasks()


def hold_out_clusters(rows: dict[str, list[Row]], options: Options, report: dict) -> dict[str, list[Row]]:
    """Move every labelled record whose task belongs to a held-out cluster from train and validation to test,
    for zero-shot evaluation on task clusters the model never trained on (FLAN)."""
    tasks = _task_types(options)
    held = set(options.instruct.held_out_clusters)
    unknown = held - {t.cluster for t in tasks.values()}
    if unknown:
        raise DataError(f"data.instruct.held_out_clusters: no task type is in cluster(s) {sorted(unknown)} "
                        f"(clusters: {sorted({t.cluster for t in tasks.values()})})")

    def held_out(row: Row) -> bool:
        return row.kind == "task" and row.task in tasks and tasks[row.task].cluster in held

    moved = [r for name in ("train", "validation") for r in rows[name] if held_out(r)]
    report["held_out_clusters"] = {"clusters": sorted(held), "rows": len(moved)}
    return {"train": [r for r in rows["train"] if not held_out(r)],
            "validation": [r for r in rows["validation"] if not held_out(r)],
            "test": rows["test"] + moved}


def render_tasks(rows: dict[str, list[Row]], options: Options) -> dict[str, list[Row]]:
    """Labelled records -> instruction (chat) rows, one seeded template each; few-shot exemplars come from
    the training records of the same source and task only."""
    from tunesmith.data.instruct import FewShot, build_examples

    o = options.instruct
    tasks = _task_types(options)
    pools: dict[tuple[str, str], list[dict]] = {}
    for row in rows["train"]:
        if row.kind == "task":
            pools.setdefault(_task_key(row), []).append(row.record)
    rendered = {}
    for name, split_rows in rows.items():
        out = []
        for key, group in _task_groups(split_rows):
            fewshot = FewShot(pools.get(key, []), o.shots, o.fewshot_format, source=f"{key[0]} (train)") \
                if o.shots else None
            examples = build_examples([r.record for r in group], key[1], tasks=tasks, seed=options.seed,
                                      template_ids=o.template_ids or None, inverted=o.inverted, cot=o.cot,
                                      fewshot=fewshot, system_prompt=options.system_prompt, source=key[0])
            out += [Row(r.source, messages=tuple(e["messages"]), task=e["task"]) for r, e in zip(group, examples)]
        out += [r for r in split_rows if r.kind != "task"]
        rendered[name] = out
    return rendered


def _task_key(row: Row) -> tuple[str, str]:
    """(file, task) of a labelled record: few-shot pools never mix datasets."""
    return row.source.rsplit(":", 1)[0], row.task


def _task_groups(rows: list[Row]) -> list[tuple[tuple[str, str], list[Row]]]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.kind == "task":
            groups.setdefault(_task_key(row), []).append(row)
    return list(groups.items())


def _stratum(row: Row, by: str) -> str:
    if by == "label":
        if row.label is None:
            raise DataError(f"{row.source}: data.split.stratify_by=label, but the row has no label")
        return row.label
    return getattr(row, "task", None) or row.kind


def fingerprint(tokenizer, sources: dict[str, Sequence[Source]], options: Options, clean=None) -> str:
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
    state = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "template": tokenizer.chat_template,
                        "special": tokenizer.all_special_tokens, "class": type(tokenizer).__name__})
    return hashlib.sha256(state.encode()).hexdigest()


def _save_cached(path: Path, splits: dict[str, Sequence[Example]], report: dict) -> None:
    """Arrow tables per split + the report, written to a temporary name and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, examples in splits.items():
        if len(examples):  # an empty Arrow table does not load back; a missing split reads as empty
            _as_table(examples).save_to_disk(str(tmp / name))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _as_table(examples: Sequence[Example]):
    from datasets import Dataset

    if isinstance(examples, ExampleTable):
        return examples.table.flatten_indices()
    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
                              "source": [e.source for e in examples],
                              "position_ids": [e.position_ids for e in examples]})


def _load_cached(path: Path) -> tuple[dict[str, Sequence[Example]], dict] | None:
    if not (path / "report.json").is_file():
        return None
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
