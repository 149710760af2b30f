"""The peak: the components of a training step's memory and the phases of the step that hold them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tunesmith.train.estimate.activations import activation_bytes, autocast_copy_bytes, dora_fixed_bytes, \
    layer_activation_bytes, mask_bytes
from tunesmith.train.estimate.logits import logits_bytes, logits_dtype_bytes
from tunesmith.train.estimate.params import trainable_params, weight_bytes
from tunesmith.train.estimate.plan import Plan, param_dtype_bytes
from tunesmith.train.estimate.shape import ModelShape
from tunesmith.train.estimate.speed import flops_per_token

# The components each phase holds, by the phase that peaks.
HELD_AT = {"loss": ["weights", "optimizer state", "activations", "logits and loss"],
           "reference": ["weights", "optimizer state", "activations", "logits and loss"],
           "update": ["weights", "optimizer state", "gradients"],
           "evaluation": ["weights", "optimizer state", "validation logits"]}


@dataclass
class Estimate:
    components: dict[str, float]  # bytes
    phases: dict[str, float]  # bytes at each phase of a step
    at_peak: list[str]  # components held at the peak
    flops_per_token: float
    trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def estimate_memory(shape: ModelShape, plan: Plan) -> Estimate:
    """Components and the peak of one training step (bytes) and the FLOPs per token."""
    s = shape
    trainable = trainable_params(s, plan)
    weights = weight_bytes(s, plan)
    grads, optimizer = trainable * param_dtype_bytes(plan), 2 * trainable * param_dtype_bytes(plan)
    components = {"weights": weights, "reference model": weights if plan.reference_copy else 0.0,
                  "gradients": grads, "optimizer state": optimizer, "activations": activation_bytes(s, plan),
                  "autocast weight copies": autocast_copy_bytes(s, plan),
                  "logits and loss": max(logits_bytes(s, plan).values()),
                  "validation logits": validation_bytes(s, plan)}
    phases = step_phases(s, plan, components)
    phase = max(phases, key=phases.get)
    at_peak = list(HELD_AT[phase])
    if phase == "loss" and plan.grad_accum > 1:
        at_peak.append("gradients")
    if components["reference model"]:
        at_peak.append("reference model")
    if components["autocast weight copies"] and "activations" in at_peak:
        at_peak.append("autocast weight copies")
    return Estimate(components, phases, at_peak, flops_per_token(s, plan), trainable)


def step_phases(shape: ModelShape, plan: Plan, components: dict[str, float]) -> dict[str, float]:
    """Bytes held at each phase of a step (the package docstring lists them), from the step's components."""
    s, c = shape, components
    kept = c["weights"] + c["reference model"] + c["optimizer state"]
    held = kept + c["activations"] + c["autocast weight copies"] + (c["gradients"] if plan.grad_accum > 1 else 0)
    phases = {"loss": held + c["logits and loss"]}
    if plan.reference_pass:  # the policy's loss rows stay while the reference makes its logits
        policy_rows = plan.loss_rows * s.vocab * logits_dtype_bytes(plan) if plan.vocab_logits else 0.0
        # A frozen copy is not prepared by accelerate: it runs without autocast.
        reference_plan = dataclasses.replace(plan, amp=plan.amp and not plan.reference_copy)
        phases["reference"] = held + policy_rows + logits_bytes(s, reference_plan)["forward"]
    recompute = 0.0
    if plan.gradient_checkpointing:  # one block rebuilt, with its weights' autocast copies
        recompute = plan.rows * plan.seq_len * layer_activation_bytes(s, plan, s.layers - 1) + mask_bytes(plan) + \
            dora_fixed_bytes(s, plan, s.layers - 1) + (2 * s.block_matmul_params if plan.amp else 0)
    phases["update"] = kept + c["gradients"] + recompute
    if plan.eval_rows and plan.vocab_logits:
        phases["evaluation"] = kept + c["validation logits"]
    return phases


def validation_bytes(shape: ModelShape, plan: Plan) -> float:
    """The logits of a validation batch (no gradients, its own number of rows), when there is validation data."""
    if not (plan.eval_rows and plan.vocab_logits):
        return 0.0
    batch = dataclasses.replace(plan, rows=plan.eval_rows, loss_rows=plan.loss_rows * plan.eval_rows // plan.rows)
    return logits_bytes(shape, batch)["forward"]
