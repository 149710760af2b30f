"""What a path holds: the one answer that train, eval, chat, serve, merge and export all ask.

    hub          a hub id ("org/name"): weights, tokenizer and template come from the hub
    model        a directory of full weights (a base, a merged model, a full fine-tune's final/); also what a .gguf
                 file or a packaged model name becomes once converted (`model.sources.resolve_model_path`)
    adapter      a PEFT adapter (a LoRA / QLoRA / DoRA / prompt run's final/, or any adapter whose
                 adapter_config.json names its base)
    reft         a ReFT run's final/: interventions (reft_config.json) that go back on the base
    features     a feature-based run's final/: a frozen model and its fitted classifier
    checkpoint   a training checkpoint (checkpoints/step-N/): trainable weights that its run's config.yaml rebuilds
                 the model around

A run directory (config.yaml + final/) stands for its final/. Nothing is loaded here: `resolve_source` reads file
names and small JSON files only, so a wrong path fails before seconds are spent on weights.

    src = resolve_source("runs/x")      # ModelSource(kind="adapter", weights="HuggingFaceTB/...", ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.config.objectives import OBJECTIVES
from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.features import CONFIG_FILE as FEATURES_CONFIG
from tunesmith.model.reft import CONFIG_FILE as REFT_CONFIG
from tunesmith.model.sources import resolve_model_path
from tunesmith.model.trainable import WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"
KINDS = ("hub", "model", "adapter", "reft", "features", "checkpoint")


@dataclass(frozen=True)
class QuantSettings:
    """How a QLoRA run quantised its base (the run config's strategy.quant)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"


@dataclass(frozen=True)
class ModelSource:
    """Where each part of a model comes from.

    Attributes:
        path: what the user named.
        kind: one of KINDS.
        target: the directory that holds it (a run's final/, a checkpoint, a converted GGUF); None for a hub id.
        run: the run directory it belongs to (the one with config.yaml), or None.
        weights: the full weights to load (a directory or hub id): the base of an adapter, a ReFT run or a
            checkpoint, else the model itself ("" for a checkpoint of a model built from scratch).
        adapter: the PEFT adapter directory, or None.
        tokenizer: where the tokenizer (and its chat template) comes from.
        generation: a directory whose generation_config.json holds the stop tokens training set, or None.
        quant: the 4-bit settings the adapter was trained on (QLoRA), or None.
        name: a short name (the run's or the directory's), e.g. for the served model id.
        base: the model it was fine-tuned from, when known (the baseline of a forgetting comparison).
        classifier: text in, label out (a classify run, a feature-based run, a sequence-classification model):
            it scores no tokens and generates no text.
    """

    path: str
    kind: str
    target: Path | None
    run: Path | None
    weights: str
    adapter: Path | None
    tokenizer: str
    generation: Path | None
    quant: QuantSettings | None
    name: str
    base: str | None = None
    classifier: bool = False

    def run_config(self):
        """The run's Config (its config.yaml), or None outside a run."""
        return _load_run_config(self.run) if self.run is not None else None


def resolve_source(path: str, base: str | None = None) -> ModelSource:
    """Say what `path` holds and where each part of its model comes from (nothing is loaded).

    Args:
        path: a model, run, adapter, ReFT, feature-based or checkpoint directory, a .gguf file, a packaged model
            name, or a hub id.
        base: the base model of an adapter, overriding what the run config / adapter_config.json says
            (for a base that has moved since training).
    Raises:
        ConfigError when `path` is none of these.
    """
    p = Path(resolve_model_path(path))  # a GGUF file or packaged model: its converted directory
    if not p.exists():
        if looks_local(path):
            raise ConfigError(f"{path}: no such model, run or adapter directory")
        return ModelSource(path, "hub", None, None, path, None, path, None, None, path.rsplit("/", 1)[-1])
    if not p.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a model, run or adapter directory)")
    run, target = _run_and_target(p)
    kind = _kind(target)
    cfg = _load_run_config(run) if run else None
    name = run.name if run else (p.resolve().parent.name if p.name == "final" else p.resolve().name)
    parts = {"adapter": _adapter_parts, "reft": _reft_parts, "checkpoint": _checkpoint_parts}.get(kind, _model_parts)
    weights, tokenizer, fine_tuned_from, quant = parts(target, cfg, base)
    return ModelSource(path, kind, target, run, weights, target if kind == "adapter" else None, tokenizer,
                       _generation_dir(target), quant, name, fine_tuned_from,
                       _is_classifier(target, kind, cfg))


def require_generative(src: ModelSource) -> None:
    """Refuse, with what to do instead, a source that chat, serve, merge and export cannot load as a causal LM."""
    if src.kind == "checkpoint":
        raise ConfigError(f"{src.path}: a training checkpoint holds only trainable weights and optimizer state; "
                          "use the run's final/ (or evaluate the checkpoint with tunesmith eval)")
    if src.kind in ("reft", "features"):
        what = "ReFT interventions" if src.kind == "reft" else "a feature-based classifier"
        raise ConfigError(f"{src.path}: {what}, which only tunesmith eval loads; chat, serve, merge and export "
                          "take a model or an adapter")


def looks_local(name: str) -> bool:
    """A local path rather than a hub id ("org/name" or "name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc})") from None


def has_tokenizer(path: Path | str) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def _kind(target: Path) -> str:
    if (target / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (target / WEIGHTS).is_file():
        return "checkpoint"
    if (target / REFT_CONFIG).is_file():
        return "reft"
    if (target / FEATURES_CONFIG).is_file():
        return "features"
    if not (target / "config.json").is_file():
        raise ConfigError(f"{target}: neither a model (config.json) nor an adapter ({ADAPTER_CONFIG})")
    return "model"


def _run_and_target(p: Path) -> tuple[Path | None, Path]:
    """(run directory or None, the directory holding the weights, adapter or checkpoint)."""
    if (p / RUN_CONFIG).is_file() and not (p / "config.json").is_file() and not (p / ADAPTER_CONFIG).is_file():
        if not (p / "final").is_dir():
            raise ConfigError(f"{p}: a run directory without final/ (did training finish?); pass a model or "
                              "adapter directory")
        return p, p / "final"
    if p.name == "final" and (p.parent / RUN_CONFIG).is_file():
        return p.parent, p
    if (p / WEIGHTS).is_file():
        run = p.parent.parent  # <run>/checkpoints/step-N
        if not (run / RUN_CONFIG).is_file():
            raise ConfigError(f"model.name_or_path: {p} is a training checkpoint, but its run's {run / RUN_CONFIG} "
                              "is missing (it says how to rebuild the model)")
        return run, p
    return None, p


def _adapter_parts(target: Path, cfg, base: str | None):
    weights = base or (cfg.model.name_or_path if cfg else None) or _named_base(target / ADAPTER_CONFIG)
    _check_base_exists(weights, target)
    tokenizer = str(target) if has_tokenizer(target) else ((cfg.model.tokenizer if cfg else None) or weights)
    return weights, tokenizer, weights, _quant_settings(cfg) if cfg else None


def _reft_parts(target: Path, cfg, base: str | None):
    weights = base or (cfg.model.name_or_path if cfg else None) or _named_base(target / REFT_CONFIG)
    return weights, str(target) if has_tokenizer(target) else weights, weights, None


def _checkpoint_parts(target: Path, cfg, base: str | None):
    weights = cfg.model.name_or_path or ""  # "": built from scratch (model.init), no baseline
    return weights, cfg.model.tokenizer or weights, weights or None, _quant_settings(cfg)


def _model_parts(target: Path, cfg, base: str | None):
    tokenizer = str(target) if has_tokenizer(target) else ((cfg.model.tokenizer or cfg.model.name_or_path)
                                                           if cfg else str(target))
    fine_tuned_from = (cfg.model.name_or_path or None) if cfg and target.name == "final" else None
    return str(target), tokenizer, fine_tuned_from, None


def _is_classifier(target: Path, kind: str, cfg) -> bool:
    """Text in, label out, read from the files alone: a feature-based run, a run with `train.objective:
    classify`, a SEQ_CLS adapter, a ReFT run that trained a head, or a sequence-classification model."""
    if kind == "features":
        return True
    if cfg is not None:
        return OBJECTIVES[cfg.train.objective].head == "classification"
    if kind == "adapter":
        return read_json(target / ADAPTER_CONFIG).get("task_type") == "SEQ_CLS"
    if kind == "reft":
        return bool(read_json(target / REFT_CONFIG).get("trained_base_parameters"))
    if kind == "model":
        architectures = read_json(target / "config.json").get("architectures") or []
        return any(a.endswith("ForSequenceClassification") for a in architectures)
    return False


def _load_run_config(run: Path):
    return load_config(run / RUN_CONFIG)


def _quant_settings(cfg) -> QuantSettings | None:
    if cfg.strategy.name != "qlora":
        return None
    q = cfg.strategy.quant
    return QuantSettings(q.quant_type, q.double_quant, q.compute_dtype)


def _named_base(config_file: Path) -> str:
    base = read_json(config_file).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config_file}: no base_model_name_or_path; pass the base with --base (or keep the "
                          f"run's {RUN_CONFIG} beside its final/)")
    return base


def _check_base_exists(weights: str, adapter: Path) -> None:
    if looks_local(weights) and not Path(weights).expanduser().exists():
        raise ConfigError(f"{adapter}: its base model {weights} does not exist (moved?); pass it with --base")


def _generation_dir(path: Path) -> Path | None:
    return path if (path / "generation_config.json").is_file() else None
