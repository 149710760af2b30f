"""`tunesmith merge`: fold a LoRA / DoRA / QLoRA adapter into its base and save a standalone model.

Every merge is checked: the merged model and base + adapter score the same probe tokens (a chat turn, plain text
and every added token), and the largest logit difference goes into `merge_report.json`. Merging reorders the
additions of every layer, so the difference grows with the model: it is judged relative to the size of the logits
(`check_merge`: at most 1e-5 of the largest |logit| in fp32, more for 16-bit types by their precision) and by the
greedy tokens, which must agree at every probe position except near-ties. A LoRA or DoRA merge that fails
either is an error, never a silent export.

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
from tunesmith.model.loading import attach_adapter, check_adapter, dequantize_into
from tunesmith.model.resolve import ModelSource, require_generative, resolve_source
from tunesmith.model.load import DTYPES, load_model, load_tokenizer, resize_embeddings, resolve_dtype
from tunesmith.model.sources import resolve_model_path
from tunesmith.model.stops import set_stop_tokens

log = logging.getLogger(__name__)

# Relative to max(1, max |logit|). fp32: a 30-layer model merged by peft differs by ~4e-6 of its logits' size (SmolLM2:
# 1.3e-4 on logits of ~35); a wrong merge (an adapter applied twice, a missed module) moves them by far more.
MERGE_RTOL = 1e-5
EPS_MULTIPLE = 8  # 16-bit weights: each merged weight rounds by up to eps/2, and the layers compound it
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
    require_generative(src)
    if src.adapter is None:
        raise ConfigError(f"{source}: a full model, with no adapter to merge; use tunesmith export to convert it")
    save_dtype = output_dtype(dtype, src.weights)  # before minutes of merging: the base must be readable
    model, tokenizer, report = merge_source(src, allow_pickle)
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
        check = check_merge(logits(merged, probe), want, torch.float32, str(src.adapter))
        report = {"method": "dora" if config.get("use_dora") else "lora", **check,
                  "reference": "base + adapter (fp32)"}
    set_stop_tokens(merged, tokenizer, src.generation)
    report = {"source": src.path, "base": src.weights, "adapter": str(src.adapter), **report,
              "probe_tokens": probe.shape[1], "tied_embeddings": tied(merged),
              "vocab_size": merged.get_input_embeddings().weight.shape[0]}
    return merged, tokenizer, report


def merge_tolerance(reference: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(relative tolerance, absolute tolerance) for logits computed in `dtype`: the absolute one is the relative
    one times the logits' scale, max(1, max |logit|) of `reference`."""
    rtol = max(MERGE_RTOL, EPS_MULTIPLE * torch.finfo(dtype).eps)
    return rtol, rtol * logit_scale(reference)


def logit_scale(logits: torch.Tensor) -> float:
    """max(1, max |logit|): what a difference is measured against (1 keeps near-zero logits from shrinking it)."""
    return max(1.0, logits.abs().max().item())


def compare_logits(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
    """How far `got` is from `want` ((1, T, V) logits): the largest difference, absolute and relative to the
    logits' scale, and the positions whose greedy token changed outside a near-tie.

    A near-tie is a position whose top two reference logits are closer than twice the tolerance: two logits each
    off by up to the tolerance may swap there without anything being wrong.
    """
    rtol, tol = merge_tolerance(want, dtype)
    scale = logit_scale(want)
    diff = (got - want).abs().max().item()
    top2 = want.topk(2, dim=-1).values  # (1, T, 2)
    tie = (top2[..., 0] - top2[..., 1]) < 2 * tol
    changed = (got.argmax(-1) != want.argmax(-1)) & ~tie
    return {"max_logit_diff": diff, "logit_scale": scale, "relative_diff": diff / scale, "rtol": rtol,
            "tolerance": tol, "positions": want.shape[1], "near_ties": int(tie.sum()),
            "greedy_changed": int(changed.sum())}


def check_merge(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "merge") -> dict:
    """`compare_logits`, raising when the merged model is not base + adapter.

    Raises:
        ModelError with the numbers and what they mean.
    """
    c = compare_logits(got, want, dtype)
    if c["max_logit_diff"] <= c["tolerance"] and not c["greedy_changed"]:
        return c
    raise ModelError(
        f"{what}: the merged model is not base + adapter: its logits differ by up to {c['max_logit_diff']:.3g} on "
        f"logits of size {c['logit_scale']:.3g} ({c['relative_diff']:.2g} relative; rounding in "
        f"{str(dtype).removeprefix('torch.')} allows {c['rtol']:.2g}, i.e. {c['tolerance']:.3g}); the greedy token "
        f"changes at {c['greedy_changed']} of {c['positions']} probe positions (near-ties aside); the adapter cannot "
        "be merged faithfully: serve it unmerged (tunesmith serve / chat)")


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

    config = AutoConfig.from_pretrained(resolve_model_path(weights))
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def summary_line(report: dict, output: Path) -> str:
    line = (f"merged {report['method']} adapter {report['adapter']} into {report['base']} -> {output} "
            f"({report['saved_dtype']}); max logit difference vs {report['reference']}: "
            f"{report['max_logit_diff']:.3g}")
    if "relative_diff" in report:
        line += f" ({report['relative_diff']:.2g} of the logits' size {report['logit_scale']:.3g})"
    if report["method"] == "qlora":
        line += (f"; merging into the original base instead would differ by "
                 f"{report['max_logit_diff_if_merged_into_original_base']:.3g}; quantisation moved the base "
                 f"weights by {report['base_quantisation_error']['mean_relative']:.3g} (mean relative)")
    return line
