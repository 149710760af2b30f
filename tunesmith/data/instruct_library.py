"""Instruction task types and their templates: the built-in library and user YAML, loaded and checked.

Each task type (sentiment, NLI, QA, ...) declares the record fields it needs, the cluster it belongs to, about
ten Jinja templates, up to three of them inverted (the task turned around, e.g. "Write a positive review."
whose answer is the review), and optionally a chain-of-thought format. The built-in task types live in
`instruct_templates/*.yaml`; `load_tasks` adds a user's task types or templates in the same format. Templates
are compiled in a sandboxed Jinja environment when loaded and may use only names their task defines, so a bad
file fails naming its path, task and template id before any record is rendered. Rendering records with these
templates is `tunesmith.data.instruct`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

from tunesmith.errors import ConfigError

# Sandboxed: user YAML templates are data, not code. trim/lstrip_blocks: a `{% if context %}` line leaves no
# blank line or indentation behind. StrictUndefined: a typo fails instead of rendering as nothing.
_ENV = SandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False)
TASK_KEYS = ("cluster", "fields", "optional", "options", "verbalizer", "inverted_answer", "cot", "templates")
EXTEND_KEYS = ("cluster", "templates")  # what a file may change about a task type defined before it
TEMPLATE_KEYS = ("id", "prompt", "answer", "inverted")
COT_KEYS = ("prompt_suffix", "answer")


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
