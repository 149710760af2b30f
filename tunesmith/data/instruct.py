"""FLAN-style instruction templates: turn labelled records into chat examples.

Each task type (sentiment, NLI, QA, ...) declares the record fields it needs, the cluster it belongs to and
about ten Jinja templates, up to three of them inverted: the task turned around, e.g. "Write a positive
review." whose answer is the review. One template is chosen per record with a seeded RNG; few-shot exemplars
come from a training pool and never include the record itself. The built-in task types live in
`instruct_templates/*.yaml`; `load_tasks` adds a user's task types or templates in the same format, checked
when loaded. `split_clusters` holds out whole task clusters for zero-shot evaluation on unseen tasks.

An example is `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task": ...,
"template_id": ..., "inverted": bool}`, the internal chat shape of `tunesmith.data.formats`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import yaml
from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

from tunesmith.errors import ConfigError, DataError

# Sandboxed: user YAML templates are data, not code. trim/lstrip_blocks: a `{% if context %}` line leaves no
# blank line or indentation behind. StrictUndefined: a typo fails instead of rendering as nothing.
_ENV = SandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False)
TASK_KEYS = ("cluster", "fields", "optional", "options", "verbalizer", "inverted_answer", "cot", "templates")
EXTEND_KEYS = ("cluster", "templates")  # what a file may change about a task type defined before it
TEMPLATE_KEYS = ("id", "prompt", "answer", "inverted")
COT_KEYS = ("prompt_suffix", "answer")
FEWSHOT_FORMATS = ("chat", "inline")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class InstructTemplate:
    """One instruction: a prompt template and a separate answer template over a record's fields."""

    id: str
    prompt: str
    answer: str
    inverted: bool = False
    source: str = ""  # the YAML file it came from, for error messages
    variables: frozenset[str] = frozenset()  # the names prompt and answer use
    compiled: tuple[Template, ...] = field(default=(), compare=False, repr=False)  # (prompt, answer)


@dataclass(frozen=True)
class TaskType:
    """A kind of task: the fields its records need, its cluster and its templates."""

    name: str
    cluster: str
    fields: tuple[str, ...]  # required in every record
    optional: tuple[str, ...] = ()  # None in the template when a record lacks them
    options: tuple[str, ...] = ()  # default label list for `options`/`options_block`; a record's own wins
    verbalizer: Mapping[str, str] | None = None  # label -> answer word, given to templates as `label_word`
    inverted_answer: str | None = None  # the field that inverted templates produce
    cot: InstructTemplate | None = None  # prompt = suffix after the prompt, answer = reasoning + answer
    templates: tuple[InstructTemplate, ...] = ()

    @property
    def has_options(self) -> bool:
        return bool(self.options) or "options" in self.fields + self.optional

    def variables(self) -> set[str]:
        """The names a template of this task may use: its fields and the ones derived from them."""
        names = set(self.fields + self.optional)
        names |= {"options", "options_block"} if self.has_options else set()
        return names | ({"label_word"} if self.verbalizer else set())


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


# ---------------------------------------------------------------- loading and checking task types


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, which PyYAML would silently resolve to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
            seen.add(getattr(key_node, "value", None))
        return super().construct_mapping(node, deep)


def builtin_tasks() -> dict[str, TaskType]:
    """The built-in task types by name (a new dict each call; the task types themselves are immutable)."""
    return dict(_builtin_tasks())


@lru_cache(maxsize=1)
def _builtin_tasks() -> tuple[tuple[str, TaskType], ...]:
    folder = resources.files("tunesmith.data").joinpath("instruct_templates")
    tasks: dict[str, TaskType] = {}
    for path in sorted((p for p in folder.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name):
        tasks = _merge_file(tasks, path.read_text(encoding="utf-8"), str(path))
    return tuple(tasks.items())


def load_tasks(paths: str | Path | Iterable[str | Path],
               base: Mapping[str, TaskType] | None = None) -> dict[str, TaskType]:
    """Read task types and templates from YAML files, on top of `base`.

    A file is `tasks: {name: spec}`. A new name needs `cluster`, `fields` and `templates` (each with `id`,
    `prompt`, `answer`, optional `inverted`); an existing name may only add `templates` or set `cluster`.

    Args:
        paths: one YAML file or several, applied in order.
        base: the task types to extend; None for the built-in ones.
    Returns:
        All task types by name, base ones included.
    Raises:
        ConfigError naming the file, task and template id: bad YAML, unknown or missing keys, bad Jinja, or a
        template that uses a name the task does not define.
    """
    tasks = dict(builtin_tasks() if base is None else base)
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: template file not found")
        tasks = _merge_file(tasks, path.read_text(encoding="utf-8"), str(path))
    return tasks


def _merge_file(tasks: dict[str, TaskType], text: str, where: str) -> dict[str, TaskType]:
    for name, spec in _parse_task_file(text, where).items():
        at = f"{where}: task {name!r}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{at}: expected a mapping of task settings, got {type(spec).__name__}")
        tasks[name] = _extend_task(tasks[name], spec, at, where) if name in tasks else _new_task(name, spec, at, where)
    return tasks


def _parse_task_file(text: str, where: str) -> dict[str, Any]:
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"tasks"} or not isinstance(doc["tasks"], dict):
        raise ConfigError(f"{where}: expected one top-level key 'tasks' mapping task names to their settings")
    return doc["tasks"]


def _new_task(name: str, spec: dict, at: str, where: str) -> TaskType:
    _check_keys(spec, TASK_KEYS, at)
    for key in ("cluster", "fields", "templates"):
        if key not in spec:
            raise ConfigError(f"{at}: missing key {key!r} (a new task type needs cluster, fields and templates)")
    verbalizer = _verbalizer(spec.get("verbalizer"), at)
    default_options = tuple(verbalizer.values()) if verbalizer else ()
    task = TaskType(name, _text(spec["cluster"], f"{at}: cluster"), _names(spec["fields"], f"{at}: fields"),
                    _names(spec.get("optional", []), f"{at}: optional"),
                    _names(spec.get("options", default_options), f"{at}: options"), verbalizer,
                    spec.get("inverted_answer"))
    if task.inverted_answer is not None and task.inverted_answer not in task.fields + task.optional:
        raise ConfigError(f"{at}: inverted_answer {task.inverted_answer!r} is not one of its fields")
    cot = _cot(task, spec["cot"], at, where) if "cot" in spec else None
    return replace(task, cot=cot, templates=_templates(task, spec["templates"], at, where))


def _extend_task(task: TaskType, spec: dict, at: str, where: str) -> TaskType:
    for key in spec:
        if key not in EXTEND_KEYS:
            raise ConfigError(f"{at}: the task type exists already, so only {', '.join(EXTEND_KEYS)} may be given, "
                              f"not {key!r} (use a new task name to change its fields)")
    cluster = _text(spec.get("cluster", task.cluster), f"{at}: cluster")
    added = _templates(task, spec.get("templates", []), at, where, taken={t.id for t in task.templates})
    return replace(task, cluster=cluster, templates=task.templates + added)


def _templates(task: TaskType, raw: Any, at: str, where: str, taken: set[str] | None = None) -> tuple:
    if not isinstance(raw, list) or (not raw and taken is None):
        raise ConfigError(f"{at}: templates: expected a non-empty list of templates")
    templates, taken = [], set(taken or ())
    for i, item in enumerate(raw):
        template = _template(task, item, i, at, where)
        if template.id in taken:
            raise ConfigError(f"{at}: template {template.id!r}: duplicate template id")
        taken.add(template.id)
        templates.append(template)
    return tuple(templates)


def _template(task: TaskType, item: Any, index: int, at: str, where: str) -> InstructTemplate:
    if not isinstance(item, dict):
        raise ConfigError(f"{at}: templates[{index}]: expected a mapping with id, prompt and answer, "
                          f"got {type(item).__name__}")
    if not isinstance(item.get("id"), str) or not item["id"].strip():
        raise ConfigError(f"{at}: templates[{index}]: missing key 'id' (a non-empty string)")
    at = f"{at}: template {item['id']!r}"
    _check_keys(item, TEMPLATE_KEYS, at)
    if not isinstance(item.get("inverted", False), bool):
        raise ConfigError(f"{at}: inverted: expected true or false, got {item['inverted']!r}")
    return _compiled(task, item["id"], item.get("prompt"), item.get("answer"), at, where,
                     inverted=item.get("inverted", False))


def _cot(task: TaskType, raw: Any, at: str, where: str) -> InstructTemplate:
    """The chain-of-thought format: a suffix for the prompt and an answer with the worked reasoning."""
    at = f"{at}: cot"
    if not isinstance(raw, dict):
        raise ConfigError(f"{at}: expected a mapping with prompt_suffix and answer")
    _check_keys(raw, COT_KEYS, at)
    # a CoT format may add nothing to the prompt, only a worked answer
    return _compiled(task, "cot", raw.get("prompt_suffix", ""), raw.get("answer"), at, where, empty_prompt=True)


def _compiled(task: TaskType, template_id: str, prompt: Any, answer: Any, at: str, where: str,
              inverted: bool = False, empty_prompt: bool = False) -> InstructTemplate:
    """An InstructTemplate whose prompt and answer parse and use only names the task defines."""
    compiled, used = [], set()
    for key, source in (("prompt", prompt), ("answer", answer)):
        if not isinstance(source, str) or not (source.strip() or (empty_prompt and key == "prompt")):
            raise ConfigError(f"{at}: missing key {key!r} (a non-empty Jinja string)")
        template, names = _compile(source, task, f"{at}: {key}")
        compiled.append(template)
        used |= names
    return InstructTemplate(template_id, prompt, answer, inverted, where, frozenset(used), tuple(compiled))


def _compile(source: str, task: TaskType, at: str) -> tuple[Template, set[str]]:
    try:
        ast = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{at}: Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    names = meta.find_undeclared_variables(ast) - set(_ENV.globals)
    unknown = names - task.variables()
    if unknown:
        raise ConfigError(f"{at}: undefined field(s) {', '.join(sorted(unknown))}; task {task.name!r} defines "
                          f"{', '.join(sorted(task.variables()))}")
    return _ENV.from_string(ast), names


def _check_keys(spec: dict, allowed: Sequence[str], at: str) -> None:
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (expected {', '.join(allowed)})"
            raise ConfigError(f"{at}: unknown key {key!r}{hint}")


def _names(value: Any, at: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{at}: expected a list of names, got {value!r:.60}")
    return tuple(value)


def _text(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{at}: expected a non-empty string, got {value!r:.60}")
    return value


def _verbalizer(value: Any, at: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{at}: verbalizer: expected a mapping from label to answer word")
    return {str(k): v for k, v in value.items()}


def get_task(name: str, tasks: Mapping[str, TaskType] | None = None) -> TaskType:
    """The task type called `name` in `tasks` (None: the built-in ones); ConfigError with a suggestion if unknown."""
    tasks = builtin_tasks() if tasks is None else tasks
    if name not in tasks:
        close = difflib.get_close_matches(name, list(tasks), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown task type {name!r}; {hint}known: {', '.join(sorted(tasks))}")
    return tasks[name]


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

_ANSWER_MARK = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b|\banswer\s*:|####", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The answer a chain-of-thought response ends on.

    The text after the last "the answer is" / "Answer:" / "####" (a number there wins, without "$" or
    thousands commas; otherwise the words up to the end of the sentence), else the last number in the text.

    Args:
        text: a model's response.
    Returns:
        The answer as a string, or None when there is neither a marker nor a number.
    """
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        # the answer may sit on the marker's line or, after "Answer:", on the next one
        tail = text[marks[-1].end():].lstrip(" \t\n:*$").split("\n", 1)[0]
        number = _NUMBER.match(tail)
        if number:
            return number.group().replace(",", "")
        words = re.split(r"[.!?](?:\s|$)", tail, maxsplit=1)[0]
        return words.strip(" *\"'`") or None
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


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
