"""FLAN-style instruction data: turn labelled records into chat examples.

The task types and their templates are loaded and checked in `tunesmith.data.instruct_library`; the names
callers need from it (`TaskType`, `InstructTemplate`, `builtin_tasks`, `load_tasks`, `get_task`) are
re-exported here. This module renders them: one template is chosen per record with a seeded RNG; few-shot
exemplars come from a training pool and never include the record itself; `final_answer` reads the answer off
a chain-of-thought response. `build_dataset` renders one split of a `Dataset`, and `split_clusters` holds out
whole task clusters for zero-shot evaluation on unseen tasks.

An example is `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task": ...,
"template_id": ..., "inverted": bool}`, the internal chat shape of `tunesmith.data.formats`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from jinja2 import TemplateError

from tunesmith.data.instruct_library import (  # noqa: F401 (builtin_tasks, load_tasks re-exported)
    InstructTemplate,
    TaskType,
    builtin_tasks,
    get_task,
    load_tasks,
)
from tunesmith.data.answers import extract_answer
from tunesmith.errors import ConfigError, DataError

FEWSHOT_FORMATS = ("chat", "inline")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class FewShot:
    """Few-shot exemplars: `k` records drawn from `pool`, which must be training data only."""

    pool: Sequence[Mapping[str, Any]]
    k: int
    format: str = "chat"  # "chat": user/assistant turns before the query; "inline": all in one user prompt
    separator: str = "\n\n"  # between inline exemplars and the query
    source: str = "pool"  # names the pool in error messages


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset of one task type, with its training and test splits."""

    name: str
    task: str
    train: Sequence[Mapping[str, Any]] = ()
    test: Sequence[Mapping[str, Any]] = ()
    cluster: str | None = None  # None: the task type's cluster
    options: Sequence[str] | None = None  # the label list, for classification datasets


# ---------------------------------------------------------------- records to examples


def select_templates(task: TaskType, template_ids: Iterable[str] | None = None, inverted: bool = True,
                     cot: bool = False) -> tuple[InstructTemplate, ...]:
    """The templates a record may be given.

    Args:
        task: the task type.
        template_ids: keep only these ids (None: all).
        inverted: False drops the inverted templates.
        cot: chain of thought; drops inverted templates, whose answer is an input, not a worked solution.
    Returns:
        The templates, in the task's order. Raises ConfigError for unknown ids or when none are left.
    """
    if cot and task.cot is None:
        raise ConfigError(f"task type {task.name!r} has no chain-of-thought format ('cot' in its YAML)")
    chosen = task.templates
    if template_ids is not None:
        wanted = [template_ids] if isinstance(template_ids, str) else list(template_ids)  # one id, not its letters
        unknown = sorted(set(wanted) - {t.id for t in chosen})
        if unknown:
            raise ConfigError(f"task type {task.name!r} has no template(s) {', '.join(unknown)}; "
                              f"known: {', '.join(t.id for t in chosen)}")
        chosen = tuple(t for t in chosen if t.id in wanted)
    if not inverted or cot:
        chosen = tuple(t for t in chosen if not t.inverted)
    if not chosen:
        raise ConfigError(f"task type {task.name!r}: no templates left after selecting ids and dropping inverted")
    return chosen


def build_examples(records: Sequence[Mapping[str, Any]], task: str, *,
                   tasks: Mapping[str, TaskType] | None = None, seed: int = 0,
                   template_ids: Iterable[str] | None = None, inverted: bool = True, cot: bool = False,
                   fewshot: FewShot | None = None, system_prompt: str | None = None,
                   options: Sequence[str] | None = None, source: str = "records") -> list[dict[str, Any]]:
    """Render each record with one template chosen by a seeded RNG.

    A record's template and exemplars depend only on the seed and the record's content, so they do not
    change when records are added, removed or reordered.

    Args:
        records: mappings holding the task type's fields.
        task: task type name, e.g. "sentiment".
        tasks: the task types (None: the built-in ones; see `load_tasks`).
        seed: seeds the choice of template and exemplars.
        template_ids, inverted, cot: which templates may be used; see `select_templates`. With `cot` the
            answer is the task's worked-reasoning format and records need the fields it uses.
        fewshot: exemplars put before each query, drawn from training data, never the query itself.
        system_prompt: prepended as a system turn.
        options: the label list for classification-like tasks, for records that have no `options` field.
        source: names the records in error messages, as `source[index]`.
    Returns:
        One `{"messages", "task", "template_id", "inverted"}` example per record.
    Raises:
        DataError naming `source[index]` and the field for a missing field or a label not among the options.
    """
    task_type = get_task(task, tasks)
    templates = select_templates(task_type, template_ids, inverted, cot)
    cot_template = task_type.cot if cot else None
    required = _required(task_type, cot_template)
    queries = prepare_records(task_type, records, source, options, required)
    pool = None
    if fewshot:
        pool = _Pool.of(prepare_records(task_type, fewshot.pool, fewshot.source, options, required), fewshot)
    return [_example(task_type, templates, values, key, f"{source}[{i}]", seed, pool, cot_template, system_prompt)
            for i, (values, key) in enumerate(queries)]


def _required(task: TaskType, cot: InstructTemplate | None) -> tuple[str, ...]:
    """The task's fields, and with chain of thought the optional ones its answer uses (the reasoning)."""
    if cot is None:
        return task.fields
    return task.fields + tuple(sorted(cot.variables & set(task.optional)))


def prepare_records(task: TaskType, records: Sequence[Mapping[str, Any]], source: str = "records",
                    options: Sequence[str] | None = None,
                    required: Sequence[str] = ()) -> list[tuple[dict[str, Any], str]]:
    """Check each record and add the derived template variables.

    Args:
        task: the task type.
        records: mappings holding its fields.
        source: names the records in errors.
        options: the default label list (the task's own when None).
        required: required fields (the task's own when empty).
    Returns:
        (template variables, content key) per record; equal keys mean the same example.
    """
    return [_prepare_record(task, record, f"{source}[{i}]", options, required or task.fields)
            for i, record in enumerate(records)]


def _prepare_record(task: TaskType, record: Any, at: str, options: Sequence[str] | None,
                    required: Sequence[str]) -> tuple[dict[str, Any], str]:
    if not isinstance(record, Mapping):
        raise DataError(f"{at}: expected a mapping of fields, got {type(record).__name__}")
    values: dict[str, Any] = dict.fromkeys(task.optional)
    if task.has_options:
        values["options"] = list(options or task.options) or None
    values.update((k, v) for k, v in record.items() if v is not None)
    for name in required:
        if values.get(name) is None:
            raise DataError(f"{at}: {name}: missing field (task {task.name!r} needs {', '.join(required)})")
        if isinstance(values[name], str) and not values[name].strip():
            raise DataError(f"{at}: {name}: empty")
    for name in task.fields + task.optional:
        _check_value(values.get(name), name, at)
    if task.has_options:
        _add_options(task, values, at)
    key = json.dumps({k: values.get(k) for k in task.fields + task.optional}, sort_keys=True, default=str)
    return values, key


def _check_value(value: Any, name: str, at: str) -> None:
    if name == "options":
        if value is not None and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise DataError(f"{at}: options: expected a non-empty list of strings, got {value!r:.60}")
    elif value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise DataError(f"{at}: {name}: expected a string or number, got {type(value).__name__}")


def _add_options(task: TaskType, values: dict[str, Any], at: str) -> None:
    """FLAN's options block, and a check that the label is one of the options (else the answer is unreachable)."""
    if values.get("options"):
        values["options_block"] = "OPTIONS:\n" + "\n".join(f"- {option}" for option in values["options"])
    label = values.get("label")
    allowed = list(task.verbalizer) if task.verbalizer else values.get("options")
    if label is not None and allowed and label not in allowed:
        raise DataError(f"{at}: label: {label!r} is not one of {allowed} (give the label list as `options`)")
    if task.verbalizer and label is not None:
        values["label_word"] = task.verbalizer[label]


@dataclass(frozen=True)
class _Pool:
    """Few-shot records with distinct content (so exemplars never repeat), and their content keys."""

    records: tuple[dict[str, Any], ...]
    keys: tuple[str, ...]
    key_set: frozenset[str]
    fewshot: FewShot

    @classmethod
    def of(cls, prepared: list[tuple[dict[str, Any], str]], fewshot: FewShot) -> _Pool:
        if fewshot.k < 1 or fewshot.format not in FEWSHOT_FORMATS:
            raise ConfigError(f"few-shot: need k >= 1 and format in {FEWSHOT_FORMATS}, got k={fewshot.k}, "
                              f"format={fewshot.format!r}")
        distinct: dict[str, dict[str, Any]] = {}
        for values, key in prepared:
            distinct.setdefault(key, values)
        return cls(tuple(distinct.values()), tuple(distinct), frozenset(distinct), fewshot)

    def draw(self, rng: random.Random, key: str, at: str) -> list[dict[str, Any]]:
        """k distinct records other than the query."""
        k, has_query = self.fewshot.k, int(key in self.key_set)
        if len(self.records) - has_query < k:
            raise DataError(f"{at}: few-shot needs {k} exemplars but {self.fewshot.source} has only "
                            f"{len(self.records) - has_query} distinct records other than this one")
        # one index more when the query is in the pool leaves k once it is dropped, in O(k) per query
        picks = rng.sample(range(len(self.records)), k + has_query)
        return [self.records[i] for i in picks if self.keys[i] != key][:k]


def _record_rng(seed: int, task: str, key: str) -> random.Random:
    # seeded by content, not position: a record keeps its template whatever the order or size of the data
    digest = hashlib.sha256(f"{seed}\0{task}\0{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _example(task: TaskType, templates: Sequence[InstructTemplate], values: dict[str, Any], key: str, at: str,
             seed: int, pool: _Pool | None, cot: InstructTemplate | None,
             system_prompt: str | None) -> dict[str, Any]:
    rng = _record_rng(seed, task.name, key)
    template = rng.choice(templates)
    shots = [_render(template, shot, cot, f"{at} (exemplar)") for shot in pool.draw(rng, key, at)] if pool else []
    query = _render(template, values, cot, at)
    fmt, separator = (pool.fewshot.format, pool.fewshot.separator) if pool else ("chat", "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += _turns(shots, query, fmt, separator)
    return {"messages": messages, "task": task.name, "template_id": template.id, "inverted": template.inverted}


def _render(template: InstructTemplate, values: dict[str, Any], cot: InstructTemplate | None,
            at: str) -> tuple[str, str]:
    """(prompt, answer) of one record; with `cot` the prompt gains its suffix and the answer is worked."""
    try:
        prompt, answer = (t.render(values).strip() for t in template.compiled)
        if cot is not None:
            suffix, answer = (t.render(values).strip() for t in cot.compiled)
            prompt = f"{prompt}\n\n{suffix}" if suffix else prompt
    except TemplateError as exc:
        raise DataError(f"{at}: template {template.id!r} ({template.source}) failed: {exc}") from None
    if not prompt or not answer:
        raise DataError(f"{at}: template {template.id!r} rendered an empty {'answer' if prompt else 'prompt'}")
    return prompt, answer


def _turns(shots: list[tuple[str, str]], query: tuple[str, str], fmt: str, separator: str) -> list[dict[str, str]]:
    """Chat: one user/assistant pair per exemplar, then the query. Inline: exemplars and query in one prompt."""
    if fmt == "inline":
        prompt = separator.join([f"{p}\n{a}" for p, a in shots] + [query[0]])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": query[1]}]
    turns = []
    for prompt, answer in shots + [query]:
        turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return turns


# ---------------------------------------------------------------- chain of thought

def final_answer(text: str) -> str | None:
    """The answer a chain-of-thought response ends on (see `tunesmith.eval.metrics.extract_answer`)."""

    return extract_answer(text)


# ---------------------------------------------------------------- datasets and clusters


def build_dataset(dataset: Dataset, split: str = "train", *, shots: int = 0, fewshot_format: str = "chat",
                  **kwargs: Any) -> list[dict[str, Any]]:
    """Examples of one split of a dataset; few-shot exemplars always come from its training split.

    Args:
        dataset: the dataset.
        split: "train" or "test".
        shots: number of exemplars (0: zero-shot).
        fewshot_format: "chat" or "inline".
        kwargs: passed to `build_examples` (tasks, seed, template_ids, inverted, cot, system_prompt).
    Returns:
        The examples, as `build_examples` gives them.
    """
    if split not in SPLITS:
        raise ConfigError(f"dataset {dataset.name!r}: unknown split {split!r} (expected {', '.join(SPLITS)})")
    fewshot = FewShot(dataset.train, shots, fewshot_format, source=f"{dataset.name}:train") if shots else None
    return build_examples(getattr(dataset, split), dataset.task, fewshot=fewshot, options=dataset.options,
                          source=f"{dataset.name}:{split}", **kwargs)


def cluster_of(dataset: Dataset, tasks: Mapping[str, TaskType] | None = None) -> str:
    """The dataset's cluster: its own, else its task type's."""
    return dataset.cluster or get_task(dataset.task, tasks).cluster


def split_clusters(datasets: Sequence[Dataset], held_out: Iterable[str],
                   tasks: Mapping[str, TaskType] | None = None) -> tuple[list[Dataset], list[Dataset]]:
    """Split datasets by cluster for zero-shot evaluation on unseen tasks: a cluster is wholly on one side.

    Args:
        datasets: datasets with distinct names.
        held_out: names of the clusters to evaluate on and never train on.
        tasks: the task types that give a dataset its cluster (None: the built-in ones).
    Returns:
        (training datasets, held-out datasets), each in the input order.
    Raises:
        ConfigError for duplicate dataset names, an unknown held-out cluster, or nothing left to train on.
    """
    names = Counter(d.name for d in datasets)
    if any(n > 1 for n in names.values()):
        raise ConfigError(f"duplicate dataset names: {sorted(k for k, n in names.items() if n > 1)}")
    clusters = [cluster_of(d, tasks) for d in datasets]
    held_out = set(held_out)
    if held_out - set(clusters):
        raise ConfigError(f"unknown held-out cluster(s) {sorted(held_out - set(clusters))}; the datasets' "
                          f"clusters are {sorted(set(clusters))}")
    train = [d for d, c in zip(datasets, clusters) if c not in held_out]
    if not train:
        raise ConfigError("every cluster is held out; nothing is left to train on")
    return train, [d for d, c in zip(datasets, clusters) if c in held_out]


def leave_one_cluster_out(datasets: Sequence[Dataset], tasks: Mapping[str, TaskType] | None = None
                          ) -> Iterator[tuple[str, list[Dataset], list[Dataset]]]:
    """FLAN's evaluation: for each cluster, (cluster, datasets of every other cluster, that cluster's datasets)."""
    for cluster in sorted({cluster_of(d, tasks) for d in datasets}):
        yield (cluster, *split_clusters(datasets, [cluster], tasks))
