"""Load what `tunesmith eval` evaluates, and the model it started from.

    model       a directory of full weights (a base model, a merged model, a full fine-tune's final/), or a hub id
    adapter     a PEFT adapter (a LoRA run's final/): adapter_config.json names the base; base + adapter load
                with plain `peft.PeftModel.from_pretrained`
    checkpoint  a training checkpoint (checkpoints/step-N/): its run's config.yaml rebuilds the model exactly
                as training built it (tokenizer, template, strategy), then the trainable weights are loaded

The baseline is the model a fine-tune started from (the adapter's base, the run's `model.name_or_path`): the
general sets are evaluated on it too, so forgetting is measured without a second command.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.data.templates import install_template
from tunesmith.errors import ConfigError, ModelError
from tunesmith.eval.prompting import has_chat_template
from tunesmith.model.load import ensure_pad_token, load_model, load_tokenizer, resize_embeddings, resolve_dtype

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class LoadOptions:
    """How to load weights and tokenizer (from the config's `model` section and `data.template`)."""

    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    tokenizer: str | None = None  # None: the tokenizer saved with the model (or its base)
    template: str | None = None  # install this built-in chat template, as training does


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # model | adapter | checkpoint
    baseline: str | None  # the model it was fine-tuned from, when known


def model_kind(path: str) -> str:
    """"adapter", "checkpoint" or "model" (a hub id is a model)."""
    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (p / CHECKPOINT_WEIGHTS).is_file():
        return "checkpoint"
    return "model"


def load_for_eval(path: str, options: LoadOptions = LoadOptions()) -> Loaded:
    """The model at `path` in eval mode on the best device, its tokenizer (chat template, pad token), and its
    baseline. Generation stops at the chat template's end-of-turn token as well as at EOS."""
    kind = model_kind(path)
    if kind == "checkpoint":
        model, tokenizer, baseline = _checkpoint(Path(path))
    elif kind == "adapter" and not options.tokenizer and not options.template:
        # The delivery loader: embeddings grown to the run's tokenizer, a QLoRA base dequantised from its 4-bit
        # weights (the model that was trained, not the full-precision original).
        from tunesmith.export.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(path, dtype=options.dtype, allow_pickle=options.allow_pickle)
        baseline = _adapter_base(Path(path))
    else:
        base = _adapter_base(Path(path)) if kind == "adapter" else path
        tokenizer = _tokenizer(options.tokenizer or (path if _has_tokenizer(path) else base), options)
        model = _weights(base, tokenizer, options)
        if kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
        baseline = base if kind == "adapter" else _run_base(Path(path))
    _stop_at_end_of_turn(model, tokenizer)
    log.info("loaded %s (%s)%s", path, kind, f", fine-tuned from {baseline}" if baseline else "")
    return Loaded(_to_device(model).eval(), tokenizer, kind, baseline)


def load_baseline(path: str, tokenizer, options: LoadOptions = LoadOptions()) -> torch.nn.Module:
    """The baseline's weights, with embeddings grown to `tokenizer` (the evaluated model's, so both models get
    the same prompts), as training grew them."""
    model = _weights(path, tokenizer, options)
    _stop_at_end_of_turn(model, tokenizer)
    return _to_device(model).eval()


def _tokenizer(name: str, options: LoadOptions):
    tokenizer = load_tokenizer(name, options.revision, options.trust_remote_code)
    if options.template:
        install_template(tokenizer, options.template)
    ensure_pad_token(tokenizer)
    return tokenizer


def _weights(name: str, tokenizer, options: LoadOptions):
    model = load_model(name, dtype=resolve_dtype(options.dtype), attn_implementation=options.attn_implementation,
                       revision=options.revision, trust_remote_code=options.trust_remote_code,
                       allow_pickle=options.allow_pickle)
    resize_embeddings(model, tokenizer)
    return model


def _checkpoint(path: Path):
    """Rebuild the run's model as training built it and load the checkpoint's trainable weights."""
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.train.checkpoint import load_trainable_state, verify
    from tunesmith.train.run import build_model, build_tokenizer

    run_config = path.parent.parent / RUN_CONFIG
    if not run_config.is_file():
        raise ConfigError(f"model.name_or_path: {path} is a training checkpoint, but its run's {run_config} is "
                          "missing (it says how to rebuild the model)")
    problem = verify(path)
    if problem is not None:
        raise ModelError(f"{path}: damaged checkpoint: {problem}")
    cfg = load_config(run_config)
    tokenizer, added = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, added)
    load_trainable_state(model, load_file(path / CHECKPOINT_WEIGHTS))
    return model, tokenizer, cfg.model.name_or_path


def _adapter_base(path: Path) -> str:
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except ValueError as exc:
        raise ModelError(f"{path / ADAPTER_CONFIG}: invalid JSON ({exc})") from None
    if not base:
        raise ModelError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path, so the base model is unknown")
    return base


def _run_base(path: Path) -> str | None:
    """A run's final/ (full fine-tune) started from the run config's model."""
    run_config = path.parent / RUN_CONFIG
    if path.name != "final" or not run_config.is_file():
        return None
    from tunesmith.config import load_config

    return load_config(run_config).model.name_or_path or None


def _has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def _stop_at_end_of_turn(model, tokenizer) -> None:
    if has_chat_template(tokenizer):
        from tunesmith.train.run import set_generation_eos

        set_generation_eos(model, tokenizer)


def _to_device(model):
    if torch.cuda.is_available() and not hasattr(model, "hf_device_map"):  # quantised models are placed already
        return model.to("cuda")
    return model
