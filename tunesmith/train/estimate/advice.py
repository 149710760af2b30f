"""Advice: the setting that would lower the biggest component held at the peak, and the peak it would give."""

from __future__ import annotations

import dataclasses

from tunesmith.config import Config
from tunesmith.train.estimate.peak import Estimate, estimate_memory
from tunesmith.train.estimate.plan import Plan
from tunesmith.train.estimate.shape import LINEAR_INPUTS, ModelShape

MiB = 2**20
# Why QLoRA is not offered on a CPU (README, "What QLoRA buys on a CPU").
QLORA_ON_CPU = ("QLoRA is not offered on a CPU: bitsandbytes dequantises the 4-bit weights in every pass there, "
                "and it peaked at 1.08-1.11x LoRA's memory")


def advice(cfg: Config, shape: ModelShape, plan: Plan, est: Estimate) -> str:
    """What to change to shrink the biggest component at the peak, with the peak it would give."""
    biggest = max(est.at_peak, key=est.components.get)
    options = changes(cfg, shape, plan)[biggest]
    scored = [(estimate_memory(shape, dataclasses.replace(plan, **change)).peak, text)
              for text, change in options if not all(getattr(plan, k) == v for k, v in change.items())]
    cpu_note = f" ({QLORA_ON_CPU})" if biggest == "weights" and plan.device == "cpu" else ""
    if not scored:
        return f"{biggest} is the biggest part of the peak{cpu_note}"
    peak, text = min(scored)
    return f"{biggest} is the biggest part of the peak: {text} would give {peak / MiB:,.0f} MiB{cpu_note}"


def changes(cfg: Config, shape: ModelShape, plan: Plan) -> dict[str, list[tuple[str, dict]]]:
    """For each component, the overrides that would lower it: (override text, the Plan fields it changes)."""
    lora = {"strategy": "lora", "lora_targets": tuple(n for n in shape.block_linears if n in LINEAR_INPUTS),
            "lora_dropout": cfg.strategy.lora.dropout}
    weights = [("model.dtype=bf16", {"weight_bytes": 2})]
    if plan.device != "cpu":
        weights.append(("strategy.name=qlora", lora | {"strategy": "qlora"}))
    smaller_batch = []
    if cfg.train.micro_batch_size > 1:
        smaller_batch = [(f"train.micro_batch_size={cfg.train.micro_batch_size // 2} "
                          f"train.grad_accum={cfg.train.grad_accum * 2}",
                          {"rows": max(1, plan.rows // 2), "loss_rows": max(1, plan.loss_rows // 2),
                           "grad_accum": plan.grad_accum * 2})]
    checkpointing = [("train.gradient_checkpointing=true", {"gradient_checkpointing": True})]
    return {
        "weights": weights, "gradients": [("strategy.name=lora", lora)],
        "optimizer state": [("strategy.name=lora", lora)],
        "activations": checkpointing + smaller_batch, "autocast weight copies": checkpointing,
        "logits and loss": [(f"data.max_seq_len={plan.seq_len // 2}",
                             {"seq_len": plan.seq_len // 2, "loss_rows": plan.loss_rows // 2})] + smaller_batch,
        "reference model": [("align.precompute_ref=true", {"reference_copy": False, "reference_pass": False})],
        "validation logits": [(f"eval.batch_size={max(1, cfg.eval.batch_size // 2)}",
                               {"eval_rows": max(1, plan.eval_rows // 2)})],
    }
