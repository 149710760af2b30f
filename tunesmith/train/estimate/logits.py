"""The logits and the loss: their bytes at the forward, chunk-backward and logits-backward moments of a step, for
the chunked loss over the logits (tunesmith/objectives/tokens.py) and for the fused head + loss
(tunesmith/objectives/head.py)."""

from __future__ import annotations

from tunesmith.train.estimate.plan import Plan, param_dtype_bytes, residual_bytes
from tunesmith.train.estimate.shape import ModelShape

# The losses' chunk sizes, copied so that the estimate imports no torch (tests/test_estimate.py checks them):
LOSS_CHUNK = 4096  # rows per chunk of tunesmith.objectives.tokens (its chunk_size default)
FUSED_CHUNK = 1 << 23  # logit entries per chunk of the fused head + loss (objectives/head.py's CHUNK_ELEMENTS)
FUSED_MIN_ROWS = 128  # and its fewest rows per chunk (MIN_CHUNK_ROWS)


def logits_bytes(shape: ModelShape, plan: Plan) -> dict[str, float]:
    """Bytes of the logits and the chunked loss at their forward, chunk-backward and logits-backward moments."""
    if not plan.vocab_logits:
        return {"forward": 0.0, "chunk backward": 0.0, "logits backward": 0.0}
    if plan.fused_loss:
        return fused_loss_bytes(shape, plan)
    V, n, b = shape.vocab, plan.loss_rows, logits_dtype_bytes(plan)
    full = plan.rows * (plan.logit_positions or plan.seq_len) * V  # (R, T, V) elements
    chunk = min(n, LOSS_CHUNK)
    rows = n * V * b  # logits[keep]: the loss rows, kept for the backward
    accumulated = rows if n > LOSS_CHUNK else 0.0  # their gradient, summed over chunks
    upcast = chunk * V * 4 if b != 4 else 0.0
    forward = max(full * (b + (2 if plan.amp else 0)), full * b + rows + chunk * V * 4 + upcast)
    return {"forward": forward,
            "chunk backward": rows + accumulated + max(3 * chunk * V * 4, chunk * V * b + n * V * b),
            "logits backward": n * V * b + full * b + (full * 2 if plan.amp else 0)}


def fused_loss_bytes(shape: ModelShape, plan: Plan) -> dict[str, float]:
    """The fused head + loss. Forward: the loss positions' hidden states (gathered), the fp32 buffer of one chunk's
    logits (turned into its softmax in place; with 16-bit matmuls, under autocast or 16-bit weights, also their
    16-bit result, copied in), the hidden states' gradient and the head's weight gradient (fp32, when the head
    trains) made there, and the chunk's share of one of them before it is added in (the head's, V x H, when it
    trains; else the chunk's rows of the hidden states'). Backward: those gradients scaled (and cast to the
    weights' dtype)."""
    s, n = shape, plan.loss_rows
    hidden = n * s.hidden * (4 if plan.amp else residual_bytes(plan))
    head = s.vocab * s.hidden * 4 if plan.strategy == "full" or plan.head_trains else 0.0
    sixteen_bit = plan.amp or (plan.weight_bytes != 4 and plan.strategy != "qlora")
    rows = min(n, max(FUSED_MIN_ROWS, FUSED_CHUNK // s.vocab))
    chunk = rows * s.vocab * (4 + (2 if sixteen_bit else 0))
    share = head or rows * s.hidden * 4
    return {"forward": 2 * hidden + chunk + head + share,
            "chunk backward": 2 * hidden + head + (s.vocab * s.hidden * param_dtype_bytes(plan) if head else 0.0),
            "logits backward": 0.0}


def logits_dtype_bytes(plan: Plan) -> int:
    """fp32 under mixed precision (accelerate converts the outputs) and for QLoRA (its LM head is fp32)."""
    return 4 if plan.amp or plan.strategy == "qlora" else plan.weight_bytes
