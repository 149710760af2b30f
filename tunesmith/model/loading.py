"""Turn what a user names -- a model, run or adapter directory, a .gguf file, a hub id -- into (model, tokenizer):
the loader of chat, serve, merge, export and `tunesmith eval` (which adds checkpoints, ReFT and classifiers on
top, eval/models.py). What a path holds is `model.resolve.resolve_source`'s answer.

An adapter is attached to its base exactly as training built the model: the base's embeddings are first grown
to the adapter's tokenizer (runs may add a pad token and chat-template tokens; the new rows are deterministic, and
PEFT trainable tokens carry the trained ones). An adapter trained with QLoRA (the run's strategy says so) goes on
the *dequantised* base: the 4-bit weights it was trained against, turned back into 32-bit numbers, so what is
served or merged is the model that was evaluated, without 4-bit kernels.

    model, tokenizer = load_model_and_tokenizer("runs/x")   # a PeftModel (adapter) or a plain model, eval mode
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunesmith.errors import ModelError
from tunesmith.model.load import load_model, load_tokenizer, resize_embeddings, resolve_dtype
from tunesmith.model.resolve import (ADAPTER_CONFIG, ModelSource, QuantSettings, read_json, require_generative,
                                     resolve_source)
from tunesmith.model.stops import set_stop_tokens

log = logging.getLogger(__name__)

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
    require_generative(src)
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
    config = read_json(adapter / ADAPTER_CONFIG)
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
