"""`tunesmith merge`: fold a LoRA / DoRA / QLoRA adapter into its base and save a standalone model.

Every merge is checked: the merged model and base + adapter score the same probe tokens (a chat turn, plain text
and every added token), and the largest logit difference goes into `merge_report.json`. A LoRA or DoRA merge in
fp32 that differs by more than 1e-4 is an error, never a silent export.

QLoRA: the adapter was trained against 4-bit weights, so it is merged into those weights dequantised to fp32 (not
into the original weights, and never into 4-bit ones). The report gives the difference from the 4-bit base +
adapter that was evaluated, the difference that merging into the original weights would have caused instead, and
how far quantisation moved the base weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tunesmith.errors import ConfigError, ModelError
from tunesmith.export.hf import check_output_dir, check_shard_size, save_hf
from tunesmith.export.loading import (ModelSource, attach_adapter, check_adapter, dequantize_into, resolve_source,
                                      set_stop_tokens)
from tunesmith.model.load import DTYPES, load_model, load_tokenizer, resize_embeddings, resolve_dtype

log = logging.getLogger(__name__)

MERGE_TOLERANCE = 1e-4  # fp32: merging reorders a few additions; anything larger is a wrong merge
PROBE_MAX_TOKENS = 96


def merge_command(source: str, output: str, dtype: str = "auto", allow_pickle: bool = False,
                  base: str | None = None, max_shard_size: str = "5GB") -> dict:
    """Merge the adapter of a run or adapter directory into its base; write the model and merge_report.json.

    Args:
        source: a run directory (its final/) or an adapter directory.
        output: a new directory for the merged model.
        dtype: dtype of the saved weights: "auto" (the base checkpoint's), "fp32", "bf16" or "fp16". The merge
            itself is computed in fp32.
        base: overrides the adapter's base model path.
    Returns:
        The merge report (also printed as one line and saved as merge_report.json).
    """
    out = Path(output)
    check_output_dir(out)
    check_shard_size(max_shard_size)
    src = resolve_source(source, base)
    if src.adapter is None:
        raise ConfigError(f"{source}: a full model, with no adapter to merge; use tunesmith export to convert it")
    model, tokenizer, report = merge_source(src, allow_pickle)
    save_dtype = output_dtype(dtype, src.weights)
    save_hf(model, tokenizer, out, max_shard_size, dtype=save_dtype)
    report["saved_dtype"] = str(save_dtype).removeprefix("torch.")
    (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report, out))
    return report


def merge_source(src: ModelSource, allow_pickle: bool = False):
    """Load base + adapter in fp32, merge, and measure the merge on probe tokens.

    Returns:
        (merged model, tokenizer, report dict).
    """
    config = check_adapter(src.adapter)
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{src.adapter}: a {config.get('peft_type')} adapter has no weights to merge into the "
                         "base; serve it unmerged (tunesmith serve / chat)")
    tokenizer = load_tokenizer(src.tokenizer)
    probe = probe_ids(tokenizer)
    if src.quant is not None:
        merged, report = _merge_qlora(src, tokenizer, probe, allow_pickle)
    else:
        model = _fp32_base(src, tokenizer, allow_pickle)
        peft_model = attach_adapter(model, src.adapter)
        want = logits(peft_model, probe)
        merged = merge_adapter(peft_model)
        diff = (logits(merged, probe) - want).abs().max().item()
        if diff > MERGE_TOLERANCE:
            raise ModelError(f"{src.adapter}: the merged model's logits differ from base + adapter by {diff:.3g} "
                             f"(> {MERGE_TOLERANCE}); the adapter cannot be merged faithfully")
        report = {"method": "dora" if config.get("use_dora") else "lora", "max_logit_diff": diff,
                  "reference": "base + adapter (fp32)"}
    set_stop_tokens(merged, tokenizer, src.generation)
    report = {"source": src.path, "base": src.weights, "adapter": str(src.adapter), **report,
              "probe_tokens": probe.shape[1], "tied_embeddings": tied(merged),
              "vocab_size": merged.get_input_embeddings().weight.shape[0]}
    return merged, tokenizer, report


def merge_adapter(peft_model):
    """`merge_and_unload`, keeping tied input/output embeddings tied."""
    inner = peft_model.get_base_model()
    was_tied = tied(inner)
    merged = peft_model.merge_and_unload()
    if was_tied and not tied(merged):
        raise ModelError("merging untied the input and output embeddings (the adapter changes one of them); "
                         "retrain without adapting embed_tokens / lm_head, or untie them before training")
    return merged


def tied(model) -> bool:
    """Whether the output head is the input embedding matrix itself."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _merge_qlora(src: ModelSource, tokenizer, probe: torch.Tensor, allow_pickle: bool):
    from tunesmith.model.strategies import quantization_config

    q = src.quant
    quantized = load_model(src.weights, allow_pickle=allow_pickle, quantization_config=quantization_config(
        q.quant_type, q.double_quant, resolve_dtype(q.compute_dtype)))
    resize_embeddings(quantized, tokenizer)
    model = _fp32_base(src, tokenizer, allow_pickle)
    peft_model = attach_adapter(model, src.adapter)
    into_original = logits(peft_model, probe)  # what merging into the unquantised weights would give
    model = peft_model.unload()
    errors = dequantize_into(quantized, model)  # before the 4-bit model's first forward pass (see there)
    evaluated = logits(attach_adapter(quantized, src.adapter), probe)  # the 4-bit model training evaluated
    del quantized
    merged = merge_adapter(attach_adapter(model, src.adapter))
    diff = (logits(merged, probe) - evaluated).abs().max().item()
    report = {
        "method": "qlora", "reference": "4-bit base + adapter (as trained and evaluated)",
        "max_logit_diff": diff,
        "max_logit_diff_if_merged_into_original_base": (into_original - evaluated).abs().max().item(),
        "base_quantisation_error": {"max_relative": max(errors.values()),
                                    "mean_relative": sum(errors.values()) / len(errors),
                                    "weights": len(errors)},
        "quant": {"quant_type": q.quant_type, "double_quant": q.double_quant, "compute_dtype": q.compute_dtype},
    }
    return merged, report


def _fp32_base(src: ModelSource, tokenizer, allow_pickle: bool):
    model = load_model(src.weights, dtype=torch.float32, allow_pickle=allow_pickle)
    resize_embeddings(model, tokenizer)
    return model


def probe_ids(tokenizer) -> torch.Tensor:
    """(1, T) token ids that exercise the model: a chat turn (or plain text) and every added token."""
    text = "The capital of France is Paris. What is two plus three? It is five."
    if getattr(tokenizer, "chat_template", None):
        from tunesmith.data.templates import render

        text = render(tokenizer, [{"role": "user", "content": "What is two plus three?"},
                                  {"role": "assistant", "content": "It is five."}])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    added = sorted(getattr(tokenizer, "added_tokens_decoder", {}))
    return torch.tensor([(ids + added)[:PROBE_MAX_TOKENS]])


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(1, T, V) fp32 logits of `input_ids` in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def output_dtype(name: str, weights: str) -> torch.dtype:
    """The saved dtype: "auto" keeps the base checkpoint's dtype (fp32 when it names none)."""
    if name != "auto":
        return DTYPES[name]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(weights)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def summary_line(report: dict, output: Path) -> str:
    line = (f"merged {report['method']} adapter {report['adapter']} into {report['base']} -> {output} "
            f"({report['saved_dtype']}); max logit difference vs {report['reference']}: "
            f"{report['max_logit_diff']:.3g}")
    if report["method"] == "qlora":
        line += (f"; merging into the original base instead would differ by "
                 f"{report['max_logit_diff_if_merged_into_original_base']:.3g}; quantisation moved the base "
                 f"weights by {report['base_quantisation_error']['mean_relative']:.3g} (mean relative)")
    return line
