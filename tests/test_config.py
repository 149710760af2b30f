"""The typed config schema (tunesmith.config): YAML + `key.sub=value` overrides, helpful errors, checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunesmith.config import (
    Config,
    all_keys,
    check_paths,
    config_from_dict,
    load_config,
    save_config,
)
from tunesmith.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOTS = [REPO / "configs", REPO / "tunesmith" / "configs"]
SHIPPED = sorted(p for root in CONFIG_ROOTS if root.is_dir() for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))

YAML = """\
model:
  name_or_path: org/tiny
  dtype: fp32
data:
  train: [a.jsonl, b.jsonl]
  template: chatml
  max_seq_len: 256
strategy:
  name: lora
  lora:
    r: 4
    alpha: 8
    target_modules: [q_proj, v_proj]
train:
  lr: 1e-4
  eps: 1e-8
  betas: [0.9, 0.95]
  max_steps: 10
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(raw_or_overrides, path: Path | None = None) -> str:
    """The message of the ConfigError raised for a mapping, or for overrides on top of `path`."""
    with pytest.raises(ConfigError) as info:
        if isinstance(raw_or_overrides, dict):
            config_from_dict(raw_or_overrides)
        else:
            load_config(path, raw_or_overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Loading and overrides


def test_yaml_values_are_typed(tmp_path):
    """Values from YAML land in the right fields with the right types (1e-4 is a float, 8 -> 8.0)."""
    cfg = load_config(write(tmp_path, YAML))
    assert cfg.model.name_or_path == "org/tiny" and cfg.model.dtype == "fp32"
    assert cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.data.max_seq_len == 256
    assert cfg.strategy.lora.r == 4 and cfg.strategy.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.train.eps == 1e-8 and cfg.train.betas == [0.9, 0.95]
    assert cfg.strategy.lora.alpha == 8.0 and type(cfg.strategy.lora.alpha) is float


def test_defaults_fill_missing_keys(tmp_path):
    """Keys absent from the file keep the schema's defaults."""
    cfg = load_config(write(tmp_path, YAML))
    assert cfg.train.epochs == Config().train.epochs
    assert cfg.strategy.lora.dropout == 0.0
    assert load_config(write(tmp_path, "", "empty.yaml")) == Config()
    assert load_config(None) == Config()


def test_overrides_nested_and_float(tmp_path):
    """Overrides reach nested keys and win over the file; '1e-4' becomes a float."""
    cfg = load_config(write(tmp_path, YAML), ["strategy.lora.r=16", "train.lr=3e-5", "train.max_steps=null"])
    assert cfg.strategy.lora.r == 16
    assert cfg.train.lr == 3e-5 and type(cfg.train.lr) is float
    assert cfg.train.max_steps is None
    assert cfg.strategy.lora.alpha == 8.0  # untouched siblings stay


def test_override_creates_missing_sections():
    """An override for a section absent from the file creates it."""
    cfg = load_config(None, ["train.lr=1e-4", "eval.every=5", "data.train=one.jsonl"])
    assert (cfg.train.lr, cfg.eval.every, cfg.data.train) == (1e-4, 5, ["one.jsonl"])


def test_optional_section_filled_and_cleared_by_overrides(tmp_path):
    """model.init is null until a key of it is set; `model.init=null` clears it again (continued pretraining
    from a from-scratch config); a saved config round-trips either way."""
    assert load_config(None).model.init is None
    cfg = load_config(None, ["model.tokenizer=tok", "strategy.name=full", "model.init.num_layers=3",
                             "model.init.family=gpt2"])
    assert (cfg.model.init.num_layers, cfg.model.init.family, cfg.model.init.hidden_size) == (3, "gpt2", 128)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    cleared = load_config(tmp_path / "saved.yaml", ["model.init=null", "model.name_or_path=runs/x/final"])
    assert cleared.model.init is None and cleared.model.name_or_path == "runs/x/final"
    assert "model.init.num_layers: expected an integer" in config_error(
        ["model.tokenizer=tok", "strategy.name=full", "model.init.num_layers=two"])
    assert "unknown config key 'model.init.hiden_size' (did you mean 'model.init.hidden_size'?)" in config_error(
        ["model.init.hiden_size=2"])


def test_override_lists_and_literals():
    """Overrides take YAML lists and Literal choices."""
    cfg = load_config(None, ["data.train=[x.jsonl, y.jsonl]", "strategy.name=dora", "data.template=null"])
    assert cfg.data.train == ["x.jsonl", "y.jsonl"]
    assert cfg.strategy.name == "dora" and cfg.data.template is None


@pytest.mark.parametrize("override, expected", [
    ("model.revision=0123", "0123"),  # YAML would read octal 83
    ("data.system_prompt=yes", "yes"),  # YAML would read True
    ("data.system_prompt=Answer: briefly", "Answer: briefly"),  # YAML would read a mapping
    ("data.system_prompt=say #1", "say #1"),  # YAML would drop a comment
    ("data.system_prompt='quoted'", "quoted"),
    ("train.output_dir=1e-4", "1e-4"),
])
def test_string_override_kept_as_written(override, expected):
    """A string field takes the override's text as written, not YAML's reading of it."""
    key = override.split("=", 1)[0]
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == expected


def test_optional_string_override_null():
    """`null` still clears an optional string field."""
    assert load_config(None, ["model.tokenizer=null"]).model.tokenizer is None


@pytest.mark.parametrize("item", ["train.lr", "=3", "noequals"])
def test_malformed_override(item):
    """An override without `key=` is refused and quoted back."""
    assert config_error([item]) == f"override {item!r}: expected key.sub=value"


def test_override_into_a_value():
    """`train.lr.x=1` says train.lr is a value, not a section."""
    assert "train.lr is a value, not a section" in config_error(["train.lr.x=1"])


def test_all_keys_lists_leaves():
    """all_keys gives dotted leaves only, including nested ones, no sections."""
    keys = all_keys(Config)
    assert {"model.name_or_path", "train.lr", "strategy.lora.r", "strategy.quant.quant_type"} <= set(keys)
    assert {"model.init.num_layers", "model.init.seed"} <= set(keys)  # inside an optional section too
    assert "strategy" not in keys and "strategy.lora" not in keys and "model.init" not in keys
    assert len(keys) == len(set(keys))


# ------------------------------------------------------------------------------------------------
# Unknown keys: name the dotted key and the closest valid one


@pytest.mark.parametrize("override, key, suggestion", [
    ("modle.name_or_path=x", "modle", "model"),  # top-level typo
    ("trian.lr=1", "trian", "train"),
    ("train.lrr=1e-4", "train.lrr", "train.lr"),  # typo of a sibling
    ("strategy.lora.alpah=2", "strategy.lora.alpah", "strategy.lora.alpha"),
    ("strategy.lora.rank=4", "strategy.lora.rank", "strategy.lora.r"),  # another tool's name
    ("train.learning_rate=1e-4", "train.learning_rate", "train.lr"),
    ("train.batch_size=4", "train.batch_size", "train.micro_batch_size"),
    ("train.r=16", "train.r", "strategy.lora.r"),  # misplaced: exists in another section
    ("train.dtype=bf16", "train.dtype", "model.dtype"),
    ("model.lora.r=4", "model.lora", "strategy.lora"),  # misplaced section
    ("lr=1e-4", "lr", "train.lr"),  # a leaf at the top level
    ("model.dtyp=fp32", "model.dtyp", "model.dtype"),
    ("model.init.n_layer=2", "model.init.n_layer", "model.init.num_layers"),  # GPT-2's config name
])
def test_unknown_key_suggests_closest(override, key, suggestion):
    """The message names the unknown dotted key and the most likely intended key."""
    assert config_error([override]) == f"unknown config key '{key}' (did you mean '{suggestion}'?)"


def test_unknown_key_from_yaml_file(tmp_path):
    """Unknown keys in a file are reported like overrides, at each nesting level."""
    path = write(tmp_path, YAML + "  lrr: 1\n")
    assert config_error([], path) == "unknown config key 'train.lrr' (did you mean 'train.lr'?)"
    assert "'strategy.lora.rank'" in config_error({"strategy": {"lora": {"rank": 4}}})
    assert "'modle'" in config_error({"modle": {}})


def test_unknown_key_without_close_match_lists_valid_keys():
    """With nothing close, the message lists the valid keys of that section."""
    message = config_error(["strategy.freeze.zzzzzz=1"])
    assert message == ("unknown config key 'strategy.freeze.zzzzzz' "
                       "(valid keys here: strategy.freeze.last_n_layers, strategy.freeze.modules)")


# ------------------------------------------------------------------------------------------------
# Wrong types


@pytest.mark.parametrize("override, message", [
    ("train.epochs=two", "train.epochs: expected an integer, got str 'two'"),
    ("train.epochs=2.5", "train.epochs: expected an integer, got float 2.5"),
    ("train.resume=[1]", "train.resume: expected true/false, got list [1]"),
    ("train.resume=1", "train.resume: expected true/false, got int 1"),
    ("train.lr=fast", "train.lr: expected a number, got str 'fast'"),
    ("train.lr=true", "train.lr: expected a number, got bool True"),
    ("train.lr=nan", "train.lr: expected a finite number, got 'nan'"),
    ("train.betas=[a, 0.9]", "train.betas[0]: expected a number, got str 'a'"),
    ("data.train={a: 1}", "data.train: expected a list, got dict {'a': 1}"),
    ("train={lr: 1}x", "train: expected a mapping of keys, got str '{lr: 1}x'"),
    ("model.name_or_path=null", "model.name_or_path: expected a string, got nothing (null)"),
])
def test_wrong_type_names_key_and_value(override, message):
    """A value of the wrong type names the dotted key, the expected type and what was given."""
    assert config_error([override]) == message


@pytest.mark.parametrize("override, message", [
    ("strategy.name=lorra", "strategy.name: 'lorra' is not one of 'full', 'freeze', 'lora', 'dora', 'qlora', "
                            "'head', 'features', 'prompt_tuning', 'prefix_tuning', 'reft' (did you mean 'lora'?)"),
    ("data.template=chatm", "data.template: 'chatm' is not one of 'chatml', 'llama3', 'alpaca', 'gemma' "
                            "(did you mean 'chatml'?)"),  # Optional[Literal] keeps the suggestion
    ("tracking.log_level=INFO", "tracking.log_level: 'INFO' is not one of 'debug', 'info', 'warning', 'error' "
                                "(did you mean 'info'?)"),
])
def test_bad_literal_suggests_choice(override, message):
    """A value outside a Literal lists the choices and suggests the closest."""
    assert config_error([override]) == message


def test_wrong_type_in_yaml(tmp_path):
    """Types are checked the same way for values read from a file."""
    path = write(tmp_path, "train:\n  micro_batch_size: '4'\n")
    assert config_error([], path) == "train.micro_batch_size: expected an integer, got str '4'"


# ------------------------------------------------------------------------------------------------
# Cross-field checks


@pytest.mark.parametrize("overrides, message", [
    (["train.micro_batch_size=0"], "train.micro_batch_size: must be at least 1, got 0"),
    (["train.grad_accum=0"], "train.grad_accum: must be at least 1, got 0"),
    (["train.max_steps=0"], "train.max_steps: must be at least 1 or null, got 0"),
    (["eval.every=-1"], "eval.every: must be at least 1 or null, got -1"),
    (["data.split.validation=1.5"], "data.split.validation: a fraction below 1 or a whole count, got 1.5"),
    (["train.warmup_ratio=-0.1"], "train.warmup_ratio: must be in [0, 1), got -0.1"),
    (["train.warmup_steps=-1"], "train.warmup_steps: must not be negative, got -1"),
    (["train.weight_decay=-0.1"], "train.weight_decay: must not be negative, got -0.1"),
    (["train.betas=[0.9]"], "train.betas: expected two numbers in [0, 1), got [0.9]"),
    (["train.betas=[0.9, 1.5]"], "train.betas: expected two numbers in [0, 1), got [0.9, 1.5]"),
    (["train.lr=0"], "train.lr: must be positive, got 0.0"),
    (["train.max_grad_norm=0"], "train.max_grad_norm: must be positive, got 0.0"),
    (["strategy.lora.r=0"], "strategy.lora.r: must be at least 1, got 0"),
    (["strategy.lora.dropout=1"], "strategy.lora.dropout: must be in [0, 1), got 1.0"),
    (["strategy.name=freeze"], "strategy.freeze: set last_n_layers and/or modules, otherwise nothing trains"),
])
def test_check_rejects(overrides, message):
    """check() refuses values that are well typed but cannot work, naming the key."""
    assert config_error(overrides) == message


def test_check_accepts_valid_edges():
    """The limits themselves are fine; lora.r is not checked when LoRA is not used."""
    cfg = load_config(None, ["strategy.name=full", "strategy.lora.r=0", "train.max_grad_norm=null",
                             "data.split.validation=0", "strategy.name=freeze", "strategy.freeze.last_n_layers=1"])
    assert cfg.strategy.name == "freeze" and cfg.train.max_grad_norm is None


# ------------------------------------------------------------------------------------------------
# Files


def test_missing_config_file(tmp_path):
    """A missing config file is a ConfigError naming the path."""
    path = tmp_path / "nope.yaml"
    assert config_error([], path) == f"{path}: config file not found"


def test_invalid_yaml_names_line(tmp_path):
    """Invalid YAML names the file and line."""
    path = write(tmp_path, "train:\n  lr: [1e-4\n  epochs: 2\n")
    assert re.match(rf"{re.escape(str(path))}:\d+: invalid YAML", config_error([], path))


def test_non_mapping_yaml(tmp_path):
    """A file whose top level is not a mapping is refused."""
    path = write(tmp_path, "- a\n- b\n")
    assert config_error([], path) == f"{path}: the top level must be a mapping of sections, got list"


def test_non_utf8_yaml(tmp_path):
    """A config file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"data:\n  system_prompt: caf\xe9\n")
    assert config_error([], path).startswith(f"{path}: not UTF-8 text")


def test_save_then_load_round_trip(tmp_path):
    """save_config then load_config gives an equal Config (floats, lists, nulls, unions, unicode)."""
    cfg = load_config(write(tmp_path, YAML), ["train.lr=1e-4", "data.system_prompt=Réponds brièvement: oui",
                                              "train.max_grad_norm=null", "model.revision=0123"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config(None) != cfg


def test_check_paths_accepts_existing(tmp_path):
    """Existing data files and a local model directory pass; a hub-style id is not checked on disk."""
    (tmp_path / "model").mkdir()
    data = write(tmp_path, '{"text": "x"}\n', "d.jsonl")
    check_paths(config_from_dict({"model": {"name_or_path": str(tmp_path / "model")}, "data": {"train": [str(data)]}}))
    check_paths(config_from_dict({"model": {"name_or_path": "org/name"}, "data": {"train": [str(data)]}}))


def test_check_paths_missing_data_file(tmp_path):
    """A missing data file names its list position, e.g. data.train[1], and the path."""
    data = write(tmp_path, '{"text": "x"}\n', "d.jsonl")
    missing = tmp_path / "missing.jsonl"
    cfg = config_from_dict({"model": {"name_or_path": "org/name"}, "data": {"train": [str(data), str(missing)]}})
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    assert str(info.value) == f"data.train[1]: {missing}: data file not found"
    cfg.data.train, cfg.data.validation = [str(data)], [str(missing)]
    with pytest.raises(ConfigError, match=r"^data\.validation\[0\]: .*: data file not found"):
        check_paths(cfg)


def test_check_paths_missing_model_dir(tmp_path):
    """A local-looking model path that does not exist names model.name_or_path (and model.tokenizer)."""
    data = write(tmp_path, '{"text": "x"}\n', "d.jsonl")
    absent = tmp_path / "no-model"
    cfg = config_from_dict({"model": {"name_or_path": str(absent)}, "data": {"train": [str(data)]}})
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    assert str(info.value) == f"model.name_or_path: model directory not found: {absent}"
    cfg.model.name_or_path, cfg.model.tokenizer = "org/name", "./no-tokenizer"
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: model directory not found: \./no-tokenizer"):
        check_paths(cfg)


def test_check_paths_requires_model_and_data(tmp_path):
    """An empty model or an empty data.train is named as required."""
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: required"):
        check_paths(Config())
    with pytest.raises(ConfigError, match=r"^data\.train: required"):
        check_paths(config_from_dict({"model": {"name_or_path": "org/name"}}))


def test_check_paths_with_model_init(tmp_path):
    """model.init needs no model.name_or_path, but its model.tokenizer directory must exist."""
    data = write(tmp_path, '{"text": "x"}\n', "d.jsonl")
    raw = {"model": {"tokenizer": str(tmp_path), "init": {"num_layers": 1}}, "strategy": {"name": "full"},
           "data": {"train": [str(data)]}}
    check_paths(config_from_dict(raw))
    raw["model"]["tokenizer"] = str(tmp_path / "no-tokenizer")
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: model directory not found"):
        check_paths(config_from_dict(raw))


# ------------------------------------------------------------------------------------------------
# Shipped configs


def test_configs_folder_has_yaml():
    """If a configs folder exists and holds files, at least one of them is a YAML config."""
    for root in CONFIG_ROOTS:
        if root.is_dir() and any(p.is_file() for p in root.rglob("*")):
            assert any(p.is_relative_to(root) for p in SHIPPED), f"{root} holds files but no .yaml config"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_parses(path):
    """Every shipped YAML config loads with the schema (no unknown keys, right types, checks pass)."""
    assert isinstance(load_config(path), Config)
