"""Labelled records in the pipeline, on the row store: whole task clusters held out for unseen-task evaluation,
and records rendered into chat rows by instruction templates (FLAN), a file at a time in parallel.

Rendering keeps the order the pipeline has always given a split: the rendered rows of each (file, task)
group, groups in order of their first record, then the split's other rows. Few-shot exemplars come from the
training records of the same file and task only; those pools are held in memory while a split renders.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunesmith.data.formats import Row
from tunesmith.data.rowstore import RowStore, concat, file_rows, read_batches, read_column, run_jobs, take, write_rows
from tunesmith.errors import DataError

TaskKey = tuple[str, str]  # (file, task) of a labelled record


def task_types(options) -> dict:
    """The task types the options name: the user's template files, else the built-in library."""
    from tunesmith.data.instruct import builtin_tasks, load_tasks

    return load_tasks(options.instruct.templates) if options.instruct.templates else builtin_tasks()


def hold_out_clusters(stores: dict[str, RowStore], groups: np.ndarray | None, options, report: dict,
                      directory: Path) -> tuple[dict[str, RowStore], np.ndarray | None]:
    """Move every labelled record whose task belongs to a held-out cluster from train and validation to test,
    for zero-shot evaluation on task clusters the model never trained on (FLAN).

    Args:
        groups: the near-duplicate group of each training row, or None; returned for the rows train keeps.
    """
    tasks = task_types(options)
    held = set(options.instruct.held_out_clusters)
    unknown = held - {t.cluster for t in tasks.values()}
    if unknown:
        raise DataError(f"data.instruct.held_out_clusters: no task type is in cluster(s) {sorted(unknown)} "
                        f"(clusters: {sorted({t.cluster for t in tasks.values()})})")
    held_tasks = sorted(name for name, t in tasks.items() if t.cluster in held)
    out, moved = dict(stores), []
    for name in ("train", "validation"):
        mask = _is_held_out(stores[name], held_tasks)
        moved.append(take(stores[name], np.flatnonzero(mask), directory, f"held-{name}"))
        out[name] = take(stores[name], np.flatnonzero(~mask), directory, f"kept-{name}")
        if name == "train" and groups is not None:
            groups = groups[~mask]
    report["held_out_clusters"] = {"clusters": sorted(held), "rows": sum(map(len, moved))}
    out["test"] = concat(stores["test"], *moved)
    return out, groups


def _is_held_out(store: RowStore, held_tasks: list[str]) -> np.ndarray:
    """(N,) bool: the row is a labelled record of a held-out task."""
    if not len(store):
        return np.zeros(0, dtype=bool)
    is_task = pc.equal(read_column(store, "kind"), "task")
    held = pc.is_in(read_column(store, "task"), value_set=pa.array(held_tasks, type=pa.string()))
    return pc.fill_null(pc.and_(is_task, held), False).to_numpy(zero_copy_only=False)


def render_tasks(stores: dict[str, RowStore], options, directory: Path) -> dict[str, RowStore]:
    """Labelled records -> instruction (chat) rows, one seeded template each; few-shot exemplars come from
    the training records of the same source and task only."""
    tasks = task_types(options)
    pools = _fewshot_pools(stores["train"]) if options.instruct.shots else {}
    # build_examples prepares its exemplar pool on every call: a job renders at least a pool's worth of rows
    min_rows = max(map(len, pools.values()), default=0)
    out = {}
    for name, store in stores.items():
        if "task" not in store.all_kinds():
            out[name] = store
            continue
        jobs = _jobs(store, min_rows)
        render = functools.partial(_render_job, options=options, tasks=tasks, pools=pools, directory=directory / name)
        groups: dict[TaskKey, list[RowStore]] = {}
        rest = []
        for rendered, others in run_jobs(render, list(zip(range(len(jobs)), jobs, _group_offsets(jobs))),
                                         options.num_proc):
            for key, part in rendered:
                groups.setdefault(key, []).append(part)
            rest.append(others)
        out[name] = concat(*(part for parts in groups.values() for part in parts), *rest)
    return out


def _task_key(row: Row) -> TaskKey:
    """(file, task) of a labelled record: few-shot pools never mix datasets."""
    return row.source.rsplit(":", 1)[0], row.task


def _fewshot_pools(train: RowStore) -> dict[TaskKey, list[dict[str, Any]]]:
    pools: dict[TaskKey, list[dict[str, Any]]] = {}
    for path in train.files:
        for rows in file_rows(path):
            for row in rows:
                if row.kind == "task":
                    pools.setdefault(_task_key(row), []).append(row.record)
    return pools


def _jobs(store: RowStore, min_rows: int) -> list[list[Path]]:
    """Consecutive files, each list holding at least `min_rows` rows (but the last)."""
    jobs: list[list[Path]] = [[]]
    held = 0
    for path, length in zip(store.files, store.lengths):
        if jobs[-1] and held >= min_rows:
            jobs.append([])
            held = 0
        jobs[-1].append(path)
        held += length
    return jobs


def _group_offsets(jobs: list[list[Path]]) -> list[dict[TaskKey, int]]:
    """For each job, the number of records of each (file, task) group that earlier jobs hold."""
    seen: dict[TaskKey, int] = {}
    offsets = []
    for paths in jobs:
        offsets.append(dict(seen))
        for path in paths:
            for batch in read_batches(path, ["kind", "source", "task"]):
                kind, source, task = (batch.column(i).to_pylist() for i in range(3))
                for k, s, t in zip(kind, source, task):
                    if k == "task":
                        key = (s.rsplit(":", 1)[0], t)
                        seen[key] = seen.get(key, 0) + 1
    return offsets


def _render_job(job: tuple[int, list[Path], dict[TaskKey, int]], options, tasks: dict,
                pools: dict[TaskKey, list], directory: Path) -> tuple[list[tuple[TaskKey, RowStore]], RowStore]:
    """One job's rows: the rendered rows of each group it holds (in order of first record), and its other rows."""
    index, paths, offsets = job
    groups: dict[TaskKey, list[Row]] = {}
    others: list[Row] = []
    for path in paths:
        for rows in file_rows(path):
            for row in rows:
                (groups.setdefault(_task_key(row), []) if row.kind == "task" else others).append(row)
    rendered = [(key, write_rows(_render_group(group, key, offsets.get(key, 0), options, tasks, pools),
                                 directory, f"{index:05d}-{g}"))
                for g, (key, group) in enumerate(groups.items())]
    return rendered, write_rows(others, directory, f"{index:05d}-rest")


def _render_group(group: Sequence[Row], key: TaskKey, offset: int, options, tasks: dict,
                  pools: dict[TaskKey, list]) -> list[Row]:
    from tunesmith.data.instruct import FewShot, build_examples

    o = options.instruct
    fewshot = FewShot(pools.get(key, []), o.shots, o.fewshot_format, source=f"{key[0]} (train)") if o.shots else None
    try:
        examples = build_examples([r.record for r in group], key[1], tasks=tasks, seed=options.seed,
                                  template_ids=o.template_ids or None, inverted=o.inverted, cot=o.cot,
                                  fewshot=fewshot, system_prompt=options.system_prompt, source=key[0])
    except DataError as exc:
        raise _at_split_index(exc, key[0], offset) from None
    return [Row(r.source, messages=tuple(e["messages"]), task=e["task"]) for r, e in zip(group, examples)]


def _at_split_index(exc: DataError, source: str, offset: int) -> DataError:
    """build_examples names a record `source[i]` by its index in the records it was given; this job was given
    the group's records from `offset` on, so the index becomes the one in the whole split's group."""
    message = str(exc)
    at = re.match(rf"{re.escape(source)}\[(\d+)\]", message)
    if at is None or not offset:
        return exc
    return DataError(f"{source}[{int(at[1]) + offset}]{message[at.end():]}")
