"""Parameters: how many there are, how many train, the bytes of the weights, and which blocks train or pass
gradients."""

from __future__ import annotations

from tunesmith.train.estimate.plan import ADAPTERS, Plan
from tunesmith.train.estimate.shape import ModelShape


def model_params(shape: ModelShape, plan: Plan) -> int:
    """All parameters; a reward model has a one-output score head in place of the LM head."""
    untied_head = 0 if shape.tied else shape.vocab * shape.hidden
    return shape.params if plan.vocab_logits else shape.params - untied_head + shape.hidden


def trainable_params(shape: ModelShape, plan: Plan) -> int:
    """Parameters the optimizer steps: all (full), the adapters (r x (in + out) per adapted linear; DoRA adds a
    magnitude per output), or the last blocks and the head (freeze, head)."""
    s = shape
    if plan.strategy == "full":
        return model_params(s, plan)
    if plan.strategy in ADAPTERS:
        per_block = sum(plan.lora_r * (i + o) + (o if plan.strategy == "dora" else 0)
                        for name, (i, o) in s.block_linears.items() if name in plan.lora_targets)
        return s.layers * per_block
    return plan.freeze_layers * s.block_params + (s.vocab * s.hidden if plan.head_trains else 0)


def weight_bytes(shape: ModelShape, plan: Plan) -> float:
    """Bytes of the model's weights: P x dtype; QLoRA: `qlora_base_bytes`; adapters fp32."""
    s = shape
    base = qlora_base_bytes(s, plan) if plan.strategy == "qlora" else model_params(s, plan) * plan.weight_bytes
    adapters = trainable_params(s, plan) * 4 if plan.strategy in ADAPTERS else 0
    return base + adapters


def qlora_base_bytes(shape: ModelShape, plan: Plan) -> float:
    """QLoRA's frozen base: the block linears in 4 bit (scales included), the rest fp32 (peft's
    prepare_model_for_kbit_training). On a CPU, when the checkpoint is stored and loaded in fp32, the whole
    checkpoint stays resident too: the weights left unquantised are the memory-mapped file's own pages, which keeps
    it mapped, and quantising read every page of it (P x 4 in place of the fp32 rest: measured on SmolLM2-135M,
    docs/PERFORMANCE.md). Loaded in another dtype than stored, the file is released after loading."""
    s = shape
    linear = s.layers * s.block_matmul_params
    quantised = linear * plan.quant_bytes
    if plan.device == "cpu" and plan.weight_bytes == 4 and s.stored_bytes in (0, 4):
        return quantised + model_params(s, plan) * 4
    return quantised + (model_params(s, plan) - linear) * 4


def layer_trains(plan: Plan, layer: int, layers: int) -> bool:
    """Whether the block's own weights train (full, or one of freeze's last blocks)."""
    return plan.strategy == "full" or (plan.strategy == "freeze" and layer >= layers - plan.freeze_layers)


def on_grad_path(plan: Plan, layer: int, layers: int) -> bool:
    """Whether gradients flow through this block (something at or below it trains)."""
    if plan.strategy in ("freeze", "head"):
        return plan.strategy == "freeze" and layer >= layers - plan.freeze_layers
    return True
