"""Typed configuration: one dataclass per component, loaded from YAML plus `key.sub=value` overrides.

Every key is checked before any work starts. An unknown key or a value of the wrong type raises
`ConfigError` naming the dotted key and, for unknown keys, the closest valid one.

    cfg = load_config("configs/sft_lora.yaml", ["train.lr=1e-4", "strategy.lora.r=16"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from tunesmith.errors import ConfigError

Dtype = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """Which checkpoint to start from and how to load it."""

    name_or_path: str = ""
    tokenizer: Optional[str] = None  # defaults to name_or_path
    revision: Optional[str] = None
    dtype: Dtype = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin/.pt weights (arbitrary code on load); off by default


DataFormat = Literal["auto", "messages", "alpaca", "completion", "text", "classification", "preference", "unpaired"]


@dataclass
class SourceConfig:
    """One data source: a file, a folder or a glob, with its own format, weight and field names."""

    path: str = ""
    format: Optional[DataFormat] = None  # None: data.format
    weight: float = 1.0  # rows taken per row read: 0.5 samples half (seeded), 2 repeats every row twice
    fields: dict[str, str] = field(default_factory=dict)  # internal name -> name in the file; None: data.fields
    text_unit: Optional[Literal["file", "line"]] = None  # plain text: one document per file or per line
    task: Optional[str] = None  # labelled records of this task type (sentiment, nli, qa ...): see data.instruct


@dataclass
class QualityConfig:
    """Rows failing any of these are dropped (null: that check is off)."""

    min_chars: Optional[int] = 1
    max_chars: Optional[int] = None
    min_words: Optional[int] = None
    max_words: Optional[int] = None
    max_repeated_line_ratio: Optional[float] = 0.3  # share of lines that repeat an earlier line
    max_repeated_ngram_ratio: Optional[float] = 0.2  # share of characters in repeated word 5-grams
    max_non_text_ratio: Optional[float] = 0.5  # share of characters that are not letters, spaces, punctuation


@dataclass
class CleanConfig:
    """Cleaning steps, each off unless asked for and each counted in the data report."""

    normalize: bool = False  # Unicode (NFC/NFKC) and whitespace normalisation
    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    pii: bool = False  # e-mail, phone, IP, credit card (Luhn), IBAN, API keys -> typed placeholders
    pii_kinds: list[str] = field(default_factory=lambda: ["API_KEY", "EMAIL", "IBAN", "CREDIT_CARD", "IP", "PHONE"])
    quality: bool = False  # drop rows that fail the `quality_limits`
    quality_limits: QualityConfig = field(default_factory=QualityConfig)
    exact_dedup: bool = False
    near_dedup: Literal["off", "group", "drop"] = "off"  # group: keep rows, keep each group in one split
    near_threshold: float = 0.8  # Jaccard similarity of word 5-gram shingles (MinHash LSH)
    num_perm: int = 128


@dataclass
class InstructConfig:
    """FLAN-style templates that turn the records of sources with a `task` into instruction data."""

    templates: list[str] = field(default_factory=list)  # YAML files with more task types or templates
    template_ids: Optional[list[str]] = None  # restrict to these templates (None: all)
    inverted: bool = True  # also use the inverted templates
    shots: int = 0  # k-shot exemplars, drawn from the training split only
    fewshot_format: Literal["chat", "inline"] = "chat"
    cot: bool = False  # chain-of-thought answers (tasks with worked reasoning, e.g. arithmetic)
    held_out_clusters: list[str] = field(default_factory=list)  # whole task clusters moved to the test split


@dataclass
class SplitConfig:
    """Held-out rows taken from the training sources when no separate files are given."""

    validation: float = 0.0  # below 1: a fraction of the rows; 1 or more: a count
    test: float = 0.0
    stratify_by: Optional[Literal["label", "task"]] = None


Sources = list[Union[str, SourceConfig]]


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids and loss masks."""

    train: Sources = field(default_factory=list)
    validation: Sources = field(default_factory=list)
    test: Sources = field(default_factory=list)
    format: DataFormat = "auto"
    fields: dict[str, str] = field(default_factory=dict)  # default field mapping for every source
    text_unit: Literal["file", "line"] = "file"
    on_error: Literal["error", "skip"] = "error"  # a bad row stops the run, or is dropped and counted
    template: Optional[Literal["chatml", "llama3", "alpaca"]] = None  # None: the tokenizer's own
    system_prompt: Optional[str] = None
    train_on_prompt: bool = False
    max_seq_len: int = 1024
    truncation: Literal["right", "left", "drop"] = "right"  # keep the start, keep the end, or drop
    pack: bool = False  # SFT: best-fit packing into max_seq_len; clm: fixed blocks of max_seq_len
    split: SplitConfig = field(default_factory=SplitConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    num_proc: int = 1  # processes for tokenisation
    cache_dir: Optional[str] = None  # prepared data cached by fingerprint; None: ~/.cache/tunesmith/data


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "auto"  # "auto": per-architecture default, or "all-linear"
    rslora: bool = False


@dataclass
class FreezeConfig:
    last_n_layers: int = 0  # train the last N transformer blocks
    modules: list[str] = field(default_factory=list)  # and these named modules, e.g. ["lm_head"]


@dataclass
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "auto"


@dataclass
class StrategyConfig:
    """Which parameters train."""

    name: Literal["full", "freeze", "lora", "dora", "qlora"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = "runs/default"
    objective: Literal["sft", "clm"] = "sft"
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 42
    log_every: int = 1
    save_every: Optional[int] = None
    keep_last: int = 2
    resume: bool = False


@dataclass
class EvalConfig:
    every: Optional[int] = None  # optimizer steps between validation passes; None: only at the end
    batch_size: int = 8


@dataclass
class TrackingConfig:
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


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


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
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
        tp = _field_type(section)
        child = node.setdefault(part, {})
        if not isinstance(child, dict) or (tp is not None and not dataclasses.is_dataclass(tp)):
            raise ConfigError(f"override {item!r}: {section} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _override_value(text: str, tp: Any) -> Any:
    """The value of an override: YAML, except that a string field keeps the text as written.

    Without that exception `model.revision=0123` would become "83" (YAML octal), `data.system_prompt=yes`
    a bool and `data.system_prompt=Answer: briefly` a mapping. Quotes are removed; `null` stays null.
    """
    if not text:
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if _is_text(tp) and value is not None:
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return value if quoted else text
    return value


def _field_type(key: str) -> Any:
    """The schema type at dotted `key` (e.g. Optional[str] for 'model.tokenizer'), or None if not a field."""
    tp: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _is_text(tp: Any) -> bool:
    """str or Optional[str]."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)] == [str]
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
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
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
    if origin is Literal:
        if value in args:
            return value
        lowered = {str(a).lower(): a for a in args}
        close = difflib.get_close_matches(str(value).lower(), list(lowered), n=1)
        hint = f" (did you mean {lowered[close[0]]!r}?)" if close else ""
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{key}: {value!r} is not one of {choices}{hint}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        key_type, value_type = args
        return {_coerce(key_type, k, f"{key}.{k}"): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, (str, dict)) and _item_accepts(args[0], value):
            value = [value]  # a single path (or source) where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


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
        is_section = dataclasses.is_dataclass(hints[f.name])
        paths.append((f"{prefix}{f.name}", is_section))
        if is_section:
            paths += _schema_paths(hints[f.name], f"{prefix}{f.name}.")
    return paths


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ['model.name_or_path', ..., 'strategy.lora.r', ...]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


# ---------------------------------------------------------------------------------------------------
# Cross-field checks that need no I/O beyond existence of files.


def check(cfg: Config) -> None:
    """Checks that span several keys; raise ConfigError before any work starts."""
    t = cfg.train
    for key, value in (("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum", t.grad_accum),
                       ("train.epochs", t.epochs), ("train.log_every", t.log_every),
                       ("data.max_seq_len", cfg.data.max_seq_len), ("eval.batch_size", cfg.eval.batch_size),
                       ("train.keep_last", t.keep_last)):
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    for key, value in (("train.max_steps", t.max_steps), ("train.save_every", t.save_every),
                       ("eval.every", cfg.eval.every)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be at least 1 or null, got {value}")
    for name in ("validation", "test"):
        size = getattr(cfg.data.split, name)
        if size < 0 or (size >= 1 and size != int(size)):
            raise ConfigError(f"data.split.{name}: a fraction below 1 or a whole count, got {size}")
    if cfg.data.num_proc < 1:
        raise ConfigError(f"data.num_proc: must be at least 1, got {cfg.data.num_proc}")
    for key in ("train", "validation", "test"):
        for i, source in enumerate(getattr(cfg.data, key)):
            if isinstance(source, SourceConfig) and (not source.path or source.weight <= 0):
                raise ConfigError(f"data.{key}[{i}]: a source needs a path and a positive weight")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    for key, value in (("train.warmup_steps", t.warmup_steps), ("train.weight_decay", t.weight_decay),
                       ("strategy.freeze.last_n_layers", cfg.strategy.freeze.last_n_layers)):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    for key, value in (("train.lr", t.lr), ("train.eps", t.eps), ("train.max_grad_norm", t.max_grad_norm)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0.0 <= cfg.strategy.lora.dropout < 1.0:
        raise ConfigError(f"strategy.lora.dropout: must be in [0, 1), got {cfg.strategy.lora.dropout}")
    if cfg.strategy.name in ("lora", "dora", "qlora") and cfg.strategy.lora.r < 1:
        raise ConfigError(f"strategy.lora.r: must be at least 1, got {cfg.strategy.lora.r}")
    if cfg.strategy.name == "freeze" and not (cfg.strategy.freeze.last_n_layers or cfg.strategy.freeze.modules):
        raise ConfigError("strategy.freeze: set last_n_layers and/or modules, otherwise nothing trains")


def check_paths(cfg: Config) -> None:
    """Checks that the files and the model a run needs exist (called by commands before any work)."""
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path: required (a local model directory or a hub id)")
    _check_model_path("model.name_or_path", cfg.model.name_or_path)
    if cfg.model.tokenizer:
        _check_model_path("model.tokenizer", cfg.model.tokenizer)
    if not cfg.data.train:
        raise ConfigError("data.train: required (one or more data files)")
    from tunesmith.data.sources import resolve_paths  # imported here: config stays free of data code at import
    from tunesmith.errors import DataError

    for key in ("train", "validation", "test"):
        for i, source in enumerate(getattr(cfg.data, key)):
            path = source.path if isinstance(source, SourceConfig) else source
            try:
                resolve_paths(path)
            except DataError as exc:
                raise ConfigError(f"data.{key}[{i}]: {exc}") from None


def _check_model_path(key: str, value: str) -> None:
    """A value that looks like a filesystem path must exist; 'org/name' may be a hub id."""
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value
    if looks_local and not Path(value).expanduser().is_dir():
        raise ConfigError(f"{key}: model directory not found: {value}")
