"""Config words YAML 1.1 would read as something else (tunesmith.config.load): `no`, `off`, `0123`, dates.

Every word-choice (Literal) key of the schema, found by walking the schema, takes each of its documented values
as written, in a YAML file and as an override, so a key added later is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import pytest

import tunesmith.config.load as load
from tunesmith.config import Config, load_config
from tunesmith.errors import ConfigError

Route = tuple[Any, ...]  # key names, and 0 for "the first item of this list"


def literal_keys(cls: type, route: Route = ()) -> Iterator[tuple[Route, tuple[str, ...], bool]]:
    """(route, choices, the key holds a list of them) for every Literal key under dataclass `cls`, including
    the sections inside optional sections (model.init) and inside lists (eval.sets, data.train sources)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield from _literal_keys_in(hints[f.name], route + (f.name,))


def _literal_keys_in(tp: Any, route: Route) -> Iterator[tuple[Route, tuple[str, ...], bool]]:
    options = _options(tp)
    for option in options:
        if dataclasses.is_dataclass(option):
            yield from literal_keys(option, route)
        elif typing.get_origin(option) is Literal:
            yield route, typing.get_args(option), False
        elif typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            if typing.get_origin(item) is Literal:
                yield route, typing.get_args(item), True
            for inner in _options(item):
                if dataclasses.is_dataclass(inner):
                    yield from literal_keys(inner, route + (0,))


def _options(tp: Any) -> list[Any]:
    """The members of a Union (None left out), or [tp]."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


CASES = [(route, word, is_list) for route, words, is_list in literal_keys(Config) for word in words]


def case_id(case: tuple[Route, str, bool]) -> str:
    route, word, _ = case
    return ".".join("[0]" if step == 0 else step for step in route).replace(".[0]", "[0]") + "=" + word


def yaml_text(route: Route, value: str) -> str:
    """Block-style YAML setting `route` to `value` (written as is, unquoted)."""
    lines, indent, dash = [], "", False
    for i, step in enumerate(route):
        if step == 0:
            dash = True
            continue
        head = indent + ("- " if dash else "")
        if dash:
            indent, dash = indent + "  ", False
        lines.append(f"{head}{step}: {value}" if i == len(route) - 1 else f"{head}{step}:")
        indent += "  "
    return "\n".join(lines) + "\n"


def value_at(cfg: Config, route: Route) -> Any:
    node: Any = cfg
    for step in route:
        node = node[0] if step == 0 else getattr(node, step)
    return node


@pytest.fixture()
def no_cross_checks(monkeypatch):
    """Only the reading of each value is under test, not the cross-key checks (deepspeed needs its JSON ...)."""
    monkeypatch.setattr(load, "check", lambda cfg: None)


def test_schema_walk_finds_the_word_keys():
    """The walk reaches top-level, nested, optional-section and list-item keys (it is not vacuous)."""
    routes = {route for route, _, _ in literal_keys(Config)}
    assert {("train", "mixed_precision"), ("data", "clean", "near_dedup"), ("model", "init", "family"),
            ("eval", "sets", 0, "kind"), ("data", "train", 0, "format"), ("tracking", "sinks")} <= routes
    assert {"no", "off"} <= {word for _, word, _ in CASES}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_word_in_yaml_file(case, tmp_path, no_cross_checks):
    """`mixed_precision: no` in a file is the word 'no', not false."""
    route, word, is_list = case
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text(route, f"[{word}]" if is_list else word))
    assert value_at(load_config(path), route) == ([word] if is_list else word)


@pytest.mark.parametrize("case", [c for c in CASES if 0 not in c[0]], ids=case_id)
def test_word_as_override(case, no_cross_checks):
    """`train.mixed_precision=no` on the command line is the word 'no', not false."""
    route, word, is_list = case
    override = ".".join(route) + "=" + (f"[{word}]" if is_list else word)
    assert value_at(load_config(None, [override]), route) == ([word] if is_list else word)


def test_other_keys_keep_yaml_meaning(tmp_path):
    """Only word keys keep the text: a bool key still reads `no` as false, a number key `0x10` as 16."""
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  pack: on\n  max_seq_len: 0x10\ntrain:\n  resume: no\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.compile=yes", "data.padding_free=off"])
    assert (cfg.data.pack, cfg.train.resume, cfg.train.compile, cfg.data.padding_free) == (True, False, True, False)
    assert cfg.data.max_seq_len == 16 and cfg.train.lr == 1e-3


def test_string_keys_in_yaml_keep_text(tmp_path):
    """Free-text keys in a file keep what was written: a revision `0123` (not octal 83), a date, `yes`;
    quoted and null values are unchanged."""
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  revision: 0123\n  tokenizer: null\ndata:\n  system_prompt: yes\n"
                    "  fields: {no: off, 1: text}\ntracking:\n  wandb:\n    name: 2024-01-31\n"
                    "    entity: '1e3'\n")
    cfg = load_config(path)
    assert (cfg.model.revision, cfg.model.tokenizer, cfg.data.system_prompt) == ("0123", None, "yes")
    assert cfg.data.fields == {"no": "off", "1": "text"}
    assert (cfg.tracking.wandb.name, cfg.tracking.wandb.entity) == ("2024-01-31", "1e3")


def test_wrong_word_still_names_key_and_suggests(tmp_path):
    """A word that is not a choice is quoted as written, with the closest choice."""
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  mixed_precision: No\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "train.mixed_precision: 'No' is not one of 'no', 'bf16', 'fp16' (did you mean 'no'?)"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.pack=maybe"])
    assert str(info.value) == "data.pack: expected true/false, got str 'maybe'"


def test_non_mapping_top_level_names_yaml_type(tmp_path: Path):
    """A file holding one number is refused as an int, not as the wrapper that kept its text."""
    path = tmp_path / "cfg.yaml"
    path.write_text("5\n")
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, got int"):
        load_config(path)
