"""Turn what a user names -- a model directory, a run directory or an adapter directory -- into (model, tokenizer).

    model dir    full weights (a base, a merged model, a full fine-tune's final/) or a hub id
    run dir      a training run: config.yaml + final/ (an adapter or a full model)
    adapter dir  a PEFT adapter (a run's final/, or any adapter whose adapter_config.json names its base)

An adapter is attached to its base exactly as training built the model: the base's embeddings are first grown
to the adapter's tokenizer (runs may add a pad token and chat-template tokens; the new rows are deterministic, and
PEFT trainable tokens carry the trained ones). An adapter trained with QLoRA (the run's strategy says so) goes on
the *dequantised* base: the 4-bit weights it was trained against, turned back into 32-bit numbers, so what is
served or merged is the model that was evaluated, without 4-bit kernels.

    model, tokenizer = load_model_and_tokenizer("runs/x")   # a PeftModel (adapter) or a plain model, eval mode
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.load import load_model, load_tokenizer, resize_embeddings, resolve_dtype
from tunesmith.model.sources import resolve_model_path
from tunesmith.model.stops import set_stop_tokens

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"
CHECKPOINT_WEIGHTS = "trainable.safetensors"


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
        weights: the full weights to load (a directory or hub id): the base of an adapter, or the model itself.
        adapter: the PEFT adapter directory, or None for a full model.
        tokenizer: where the tokenizer (and its chat template) comes from.
        generation: a directory whose generation_config.json holds the stop tokens training set, or None.
        quant: the 4-bit settings the adapter was trained on (QLoRA), or None.
        name: a short name (the run's or the directory's), e.g. for the served model id.
    """

    path: str
    weights: str
    adapter: Path | None
    tokenizer: str
    generation: Path | None
    quant: QuantSettings | None
    name: str


def resolve_source(path: str, base: str | None = None) -> ModelSource:
    """Find the weights, adapter, tokenizer and quantisation of `path` (nothing is loaded).

    Args:
        path: a model, run or adapter directory, or a hub id.
        base: the base model of an adapter, overriding what the run config / adapter_config.json says
            (for a base that has moved since training).
    Raises:
        ConfigError when `path` is none of these, or is a training checkpoint.
    """
    p = Path(resolve_model_path(path))  # a GGUF file or packaged model: its converted directory
    if not p.exists():
        if looks_local(path):
            raise ConfigError(f"{path}: no such model, run or adapter directory")
        return ModelSource(path, path, None, path, None, None, path.rsplit("/", 1)[-1])  # a hub id
    if not p.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a model, run or adapter directory)")
    run, target = _run_and_target(p)
    if (target / CHECKPOINT_WEIGHTS).is_file():
        raise ConfigError(f"{path}: a training checkpoint holds only trainable weights and optimizer state; "
                          "use the run's final/ (or evaluate the checkpoint with tunesmith eval)")
    cfg = _run_config(run) if run else None
    name = run.name if run else (p.resolve().parent.name if p.name == "final" else p.resolve().name)
    if (target / ADAPTER_CONFIG).is_file():
        weights = base or (cfg.model.name_or_path if cfg else None) or _adapter_base(target)
        _check_base_exists(weights, target)
        quant = _quant_settings(cfg) if cfg else None
        tokenizer = str(target) if _has_tokenizer(target) else ((cfg.model.tokenizer if cfg else None) or weights)
        return ModelSource(path, weights, target, tokenizer, _generation_dir(target), quant, name)
    if not (target / "config.json").is_file():
        raise ConfigError(f"{target}: neither a model (config.json) nor an adapter ({ADAPTER_CONFIG})")
    tokenizer = str(target) if _has_tokenizer(target) else ((cfg.model.tokenizer or cfg.model.name_or_path)
                                                            if cfg else str(target))
    return ModelSource(path, str(target), None, tokenizer, _generation_dir(target), None, name)


def load_model_and_tokenizer(
    source: str | ModelSource,
    *,
    dtype: str = "auto",
    allow_pickle: bool = False,
    base: str | None = None,
    adapter_name: str = "default",
):
    """The model named by `source`, in eval mode on the CPU, and its tokenizer.

    Generation stops at EOS and at the chat template's end-of-turn token (`generation_config.eos_token_id`).
    The tokenizer is left as saved: no pad token is added (batching pads with any id, masked out).

    Args:
        source: a model, run or adapter directory, a hub id, or a resolved ModelSource.
        dtype: "auto" (bf16 on a CUDA device that supports it, else fp32), "fp32", "bf16" or "fp16".
        allow_pickle: allow loading base weights stored as pickle files.
        base: overrides the base model of an adapter (see resolve_source).
        adapter_name: the name the adapter gets inside the PeftModel.
    Returns:
        (model, tokenizer): a PeftModel when `source` is an adapter, else a transformers model.
    """
    src = source if isinstance(source, ModelSource) else resolve_source(source, base)
    tokenizer = load_tokenizer(src.tokenizer)
    if src.quant is not None:
        model = load_dequantized(src.weights, src.quant, resolve_dtype(dtype), allow_pickle)
    else:
        model = load_model(src.weights, dtype=resolve_dtype(dtype), allow_pickle=allow_pickle)
    resize_embeddings(model, tokenizer)
    if src.adapter is not None:
        model = attach_adapter(model, src.adapter, adapter_name)
    set_stop_tokens(model, tokenizer, src.generation)
    log.info("loaded %s (%s%s)", src.path, "adapter on " + src.weights if src.adapter else "full model",
             ", QLoRA: dequantised base" if src.quant else "")
    return model.eval(), tokenizer


def attach_adapter(model, adapter: Path, adapter_name: str = "default"):
    """`model` (a transformers model, or a PeftModel that has other adapters) with the adapter at `adapter`."""
    from peft import PeftModel

    check_adapter(adapter)
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter), adapter_name=adapter_name)
        return model
    return PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name)


def check_adapter(adapter: Path) -> dict:
    """The adapter's config; a reward-model (sequence classification) adapter is refused: it generates nothing."""
    config = _read_json(adapter / ADAPTER_CONFIG)
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ModelError(f"{adapter}: a {config.get('task_type')} adapter (e.g. a reward model) generates no text")
    return config


def load_dequantized(weights: str, quant: QuantSettings, dtype: torch.dtype, allow_pickle: bool = False):
    """The base as a QLoRA run saw it: quantised to 4 bit with the run's settings, then every 4-bit weight turned
    back into a `dtype` number. The other weights (embeddings, norms, head) are the checkpoint's own."""
    from tunesmith.model.strategies import quantization_config

    quantized = load_model(weights, allow_pickle=allow_pickle, quantization_config=quantization_config(
        quant.quant_type, quant.double_quant, resolve_dtype(quant.compute_dtype)))
    model = load_model(weights, dtype=dtype, allow_pickle=allow_pickle)
    dequantize_into(quantized, model)
    return model


def dequantize_into(quantized, model) -> dict[str, float]:
    """Copy the dequantised 4-bit weights of `quantized` into the same modules of `model`.

    Must run before `quantized` sees any input: on some CPUs bitsandbytes repacks a 4-bit weight in place at
    its first forward pass, after which it no longer dequantises.

    Returns:
        Per weight name, its relative change ||W_4bit - W|| / ||W|| (the quantisation error of each weight).
    """
    import bitsandbytes as bnb

    errors = {}
    modules = dict(model.named_modules())
    for name, module in quantized.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ModelError(f"{name}: the 4-bit weight was repacked by a forward pass and cannot be dequantised")
        target = modules[name].weight
        weight = bnb.functional.dequantize_4bit(module.weight.data, state).to(target.dtype)  # (out, in)
        with torch.no_grad():
            errors[name + ".weight"] = ((weight.float() - target.float()).norm() / target.float().norm()).item()
            target.copy_(weight)
    if not errors:
        raise ModelError("the QLoRA base has no 4-bit layers to dequantise")
    return errors


def context_length(model) -> int:
    """The longest sequence the model's positions cover."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(f"{config.model_type}: the config gives no maximum sequence length")


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_and_target(p: Path) -> tuple[Path | None, Path]:
    """(run directory or None, the directory holding the weights or adapter)."""
    if (p / RUN_CONFIG).is_file() and not (p / "config.json").is_file() and not (p / ADAPTER_CONFIG).is_file():
        if not (p / "final").is_dir():
            raise ConfigError(f"{p}: a run directory without final/ (did training finish?); pass a model or "
                              "adapter directory")
        return p, p / "final"
    if p.name == "final" and (p.parent / RUN_CONFIG).is_file():
        return p.parent, p
    return None, p


def _run_config(run: Path):
    from tunesmith.config import load_config

    return load_config(run / RUN_CONFIG)


def _quant_settings(cfg) -> QuantSettings | None:
    if cfg.strategy.name != "qlora":
        return None
    q = cfg.strategy.quant
    return QuantSettings(q.quant_type, q.double_quant, q.compute_dtype)


def _adapter_base(adapter: Path) -> str:
    base = _read_json(adapter / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base with --base")
    return base


def looks_local(name: str) -> bool:
    """A local path rather than a hub id ("org/name" or "name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _check_base_exists(weights: str, adapter: Path) -> None:
    if looks_local(weights) and not Path(weights).expanduser().exists():
        raise ConfigError(f"{adapter}: its base model {weights} does not exist (moved?); pass it with --base")


def _generation_dir(path: Path) -> Path | None:
    return path if (path / "generation_config.json").is_file() else None


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc})") from None
