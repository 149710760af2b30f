"""Loading a Config: YAML, `key.sub=value` overrides, the typed builder, and unknown-key suggestions."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tunesmith.config.checks import check
from tunesmith.config.schema import Config
from tunesmith.errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (optional), apply `key.sub=value` overrides, validate, and return a Config.

    Relative paths inside the file are kept as written (resolved against the working directory).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    cfg = build(Config, raw, prefix="")
    check(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain mapping (e.g. built in code) into a Config."""
    cfg = build(Config, raw, prefix="")
    check(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


@dataclasses.dataclass(frozen=True, repr=False)
class AsWritten:
    """A plain YAML scalar that YAML 1.1 reads as a bool, number or date, kept with its text as written.

    YAML alone cannot tell `mixed_precision: no` (the word) from `pack: no` (false): only the key's schema type
    can, so the choice waits for `_coerce`. A string or word-choice key takes the text (`no`, `off`, `0123`,
    `2024-01-01`), any other key YAML's value.
    """

    value: Any
    text: str

    def __str__(self) -> str:  # in a dotted key: `data.fields.no`
        return self.text

    def __repr__(self) -> str:  # in an error message: what YAML read (`got list [1]`)
        return repr(self.value)


class _Loader(yaml.SafeLoader):
    """SafeLoader whose plain (unquoted) bool, number and date scalars come back as `AsWritten`."""


def _construct_as_written(loader: _Loader, node: yaml.ScalarNode) -> Any:
    value = yaml.SafeLoader.yaml_constructors[node.tag](loader, node)
    return AsWritten(value, node.value) if node.style is None else value


for _tag in ("bool", "int", "float", "timestamp"):  # null stays None: `key: null` always means "unset"
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct_as_written)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:  # PyYAML's parser recurses for every nesting level: a few hundred exhaust the stack
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        found = raw.value if isinstance(raw, AsWritten) else raw
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(found).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    value = _override_value(text, _field_type(key))
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        section = ".".join(parts[: i + 1])
        tp = _section_type(_field_type(section))
        child = node.get(part)
        if child is None:  # absent, or an optional section left null (`init: null`) being filled in
            child = node[part] = {}
        if not isinstance(child, dict) or (tp is not None and not dataclasses.is_dataclass(tp)):
            raise ConfigError(f"override {item!r}: {section} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _override_value(text: str, tp: Any) -> Any:
    """The value of an override: YAML, except that a string or word-choice field keeps the text as written.

    Without that exception `model.revision=0123` would become "83" (YAML octal), `data.system_prompt=yes`
    and `train.mixed_precision=no` bools, and `data.system_prompt=Answer: briefly` a mapping. Quotes are
    removed; `null` stays null. Inside a list (`tracking.sinks=[...]`) words are kept by `AsWritten`.
    """
    if not text:
        return ""
    try:
        value = yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):  # not YAML (or nested too deeply to parse): the text as written
        return text
    if _is_text(tp) and value is not None:
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return value if quoted else text
    return value


def _field_type(key: str) -> Any:
    """The schema type at dotted `key` (e.g. Optional[str] for 'model.tokenizer'), or None if not a field."""
    tp: Any = Config
    for part in key.split("."):
        tp = _section_type(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _section_type(tp: Any) -> Any:
    """The dataclass of an optional section (Optional[ModelInitConfig] -> ModelInitConfig), else `tp`."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return tp


def _is_text(tp: Any) -> bool:
    """str, a Literal of strings, or Optional of either."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(options) == 1 and _takes_words(options[0])
    return _takes_words(tp)


def _takes_words(tp: Any) -> bool:
    """str, or a Literal whose choices are all strings (`Literal["no", "bf16", "fp16"]`)."""
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


# ---------------------------------------------------------------------------------------------------
# Validation: a small typed builder over dataclasses (no silent coercion beyond int -> float and
# numeric strings such as YAML's "1e-4" for float fields).


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from mapping `raw`; errors name the dotted key at `prefix`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key_message(f"{prefix}{key}", str(key), names, prefix, raw[key]))
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` (from YAML or an override) as the type `tp` of config key `key`; ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if isinstance(value, AsWritten) and origin not in (Union, types.UnionType):  # a union decides per option
        value = value.text if _takes_words(tp) else value.value
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, key)
    if origin is Literal:
        return _coerce_literal(typing.get_args(tp), value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(key_type, k, f"{key}.{k}"): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        item = typing.get_args(tp)[0]
        if isinstance(value, (str, dict)) and _item_accepts(item, value):
            value = [value]  # a single path (or source) where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(tp, value, key)


def _coerce_union(tp: Any, value: Any, key: str) -> Any:
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None and len(options) < len(typing.get_args(tp)):
        return None
    if len(options) == 1:  # Optional[X]: X's own message (e.g. a Literal's suggestion)
        return _coerce(options[0], value, key)
    sections = [a for a in options if dataclasses.is_dataclass(a)]
    if isinstance(value, dict) and sections:  # the section's own messages (unknown key, wrong type)
        return _coerce(sections[0], value, key)
    for arg in options:
        try:
            return _coerce(arg, value, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _coerce_literal(args: tuple, value: Any, key: str) -> Any:
    if value in args:
        return value
    lowered = {str(a).lower(): a for a in args}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=1)
    hint = f" (did you mean {lowered[close[0]]!r}?)" if close else ""
    choices = ", ".join(repr(a) for a in args)
    raise ConfigError(f"{key}: {value!r} is not one of {choices}{hint}")


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


# What peers (HF Trainer, PEFT, Axolotl, LLaMA-Factory) call some keys -> the tunesmith key.
KEY_ALIASES = {
    "learning_rate": "train.lr",
    "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "micro_batch": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_accumulation": "train.grad_accum",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "lr_scheduler_type": "train.scheduler",
    "rank": "strategy.lora.r",
    "lora_r": "strategy.lora.r",
    "lora_alpha": "strategy.lora.alpha",
    "lora_dropout": "strategy.lora.dropout",
    "max_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "cutoff_len": "data.max_seq_len",
    "base_model": "model.name_or_path",
    "validation_fraction": "data.split.validation",
    "val_set_size": "data.split.validation",
    "val_size": "data.split.validation",
    "test_size": "data.split.test",
    "packing": "data.pack",
    "sample_packing": "data.pack",
    "model_name_or_path": "model.name_or_path",
    "num_hidden_layers": "model.init.num_layers",
    "n_layer": "model.init.num_layers",
    "n_embd": "model.init.hidden_size",
    "num_attention_heads": "model.init.num_heads",
    "n_head": "model.init.num_heads",
    "num_key_value_heads": "model.init.num_kv_heads",
    "tie_word_embeddings": "model.init.tie_embeddings",
    "n_positions": "model.init.max_position_embeddings",
}


def _item_accepts(tp: Any, value: Any) -> bool:
    try:
        _coerce(tp, value, "")
    except ConfigError:
        return False
    return True


def _unknown_key_message(key: str, name: str, siblings: list[str], prefix: str, value: Any) -> str:
    match = _closest_key(name.lower(), siblings, prefix, isinstance(value, dict))
    if match:
        return f"unknown config key '{key}' (did you mean '{match}'?)"
    return f"unknown config key '{key}' (valid keys here: {', '.join(prefix + s for s in siblings)})"


def _closest_key(name: str, siblings: list[str], prefix: str, is_section: bool) -> str | None:
    """The dotted key a user most likely meant, in order: a peer's name for it (`learning_rate`), the same
    name in another section (a misplaced key: `train.r` -> `strategy.lora.r`), a typo of a key of this
    section (`train.lrr`), a typo of a key anywhere."""
    if name in KEY_ALIASES:
        return KEY_ALIASES[name]
    paths = _schema_paths(Config)
    same = [p for p, section in paths if p.rsplit(".", 1)[-1] == name]
    if same:
        return next((p for p, section in paths if p in same and section == is_section), same[0])
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return prefix + close[0]
    last_parts: dict[str, str] = {}
    for p, _ in paths:
        last_parts.setdefault(p.rsplit(".", 1)[-1], p)
    close = difflib.get_close_matches(name, list(last_parts), n=1, cutoff=0.75)
    return last_parts[close[0]] if close else None


def _schema_paths(cls: type, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted path, is a section) for every section and key of the schema."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _section_type(hints[f.name])
        is_section = dataclasses.is_dataclass(section)
        paths.append((f"{prefix}{f.name}", is_section))
        if is_section:
            paths += _schema_paths(section, f"{prefix}{f.name}.")
    return paths


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ['model.name_or_path', ..., 'strategy.lora.r', ...]."""
    return [path for path, is_section in _schema_paths(cls, prefix) if not is_section]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping of its keys"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    if isinstance(value, AsWritten):
        value = value.value
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"
