"""Activations: the tensors autograd keeps for the backward pass, per block and for the whole forward pass, and
the 16-bit weight copies autocast keeps beside them. The formulas are in the package docstring; what each
term stands for was read off the graph of a real step (tests/test_estimate.py checks them against it)."""

from __future__ import annotations

from tunesmith.train.estimate.params import layer_trains, on_grad_path
from tunesmith.train.estimate.plan import ADAPTERS, Plan, dropout_mask_bytes, matmul_bytes, residual_bytes
from tunesmith.train.estimate.shape import LINEAR_INPUTS, ModelShape

SOURCES = ("n1", "attn", "n2", "mlp")  # the tensors that feed a block's linears, in the order they are made


def grad_inputs(shape: ModelShape, plan: Plan, layer: int) -> dict[str, bool]:
    """Which of a block's tensors require grad: its input ("block") and each tensor of SOURCES. With adapters a
    tensor requires grad when the block's input does or an adapter below it in the block makes it so (q, k, v
    adapters make the attention output require grad, an o_proj adapter the residual after attention, ...);
    other strategies keep the whole block on the path."""
    block = plan.strategy == "full" or (layer > 0 and on_grad_path(plan, layer - 1, shape.layers))
    if plan.strategy not in ADAPTERS:
        return {"block": block, "n1": True, "attn": True, "n2": True, "mlp": True, "mlp_out": True}
    adapted = {LINEAR_INPUTS.get(n) for n in shape.block_linears if n in plan.lora_targets}
    attn = block or "n1" in adapted
    n2 = attn or "attn" in adapted
    mlp = n2 or "n2" in adapted
    return {"block": block, "n1": block, "attn": attn, "n2": n2, "mlp": mlp, "mlp_out": mlp or "mlp" in adapted}


def layer_activation_bytes(shape: ModelShape, plan: Plan, layer: int = 1) -> float:
    """Bytes autograd keeps per token for one block (the package docstring gives the formula)."""
    s = shape
    if not on_grad_path(plan, layer, s.layers):
        return 0.0
    grad, trains = grad_inputs(s, plan, layer), layer_trains(plan, layer, s.layers)
    # each norm's fp32 input and 1/rms, when they need grads: the pre-attention and pre-MLP norms; Gemma's post-
    # attention and post-MLP norms read o_proj's output (which needs grads where n2 does) and down_proj's
    norm_inputs = [grad["block"], grad["n2"]] + [grad["n2"], grad["mlp_out"]][:s.norms - 2]
    total = (4 * s.hidden + 4) * sum(norm_inputs)
    total += s.norms * s.hidden * residual_bytes(plan) if trains else 0  # normalised inputs, for the norm weights
    total += head_norm_bytes(s, plan, grad, trains)
    total += attention_bytes(s, plan) if grad["attn"] else 0
    total += 3 * s.intermediate * matmul_bytes(plan) if grad["mlp"] else 0  # gate, up, silu(gate)
    total += sum(linear_input_bytes(s, plan, source, trains, grad[source]) for source in SOURCES)
    adapted = [n for n in s.block_linears if n in plan.lora_targets]
    total += len(adapted) * plan.lora_r * (2 if plan.amp else 4)  # lora_A's output, kept by lora_B
    return total + dora_bytes(s, plan)


def head_norm_bytes(shape: ModelShape, plan: Plan, grad: dict[str, bool], trains: bool) -> float:
    """Bytes per token q_norm and k_norm keep (Qwen3, Gemma 3): like a block norm, each its fp32 input and a 1/rms
    per head where the projection's output needs grads (its input does, or it is adapted), and the normalised
    values where the norm's weight trains."""
    if not shape.head_norms:
        return 0.0
    total = 0.0
    for name, heads in (("q_proj", shape.heads), ("k_proj", shape.kv_heads)):
        width = heads * shape.head_dim
        total += (4 * width + 4 * heads) * (grad["n1"] or name in plan.lora_targets)
        total += width * matmul_bytes(plan) if trains else 0
    return total


def dora_bytes(shape: ModelShape, plan: Plan) -> float:
    """Bytes per token DoRA adds to one block: peft computes (m / |W + BA| - 1) * base + m / |W + BA| * lora and
    both products keep their (tokens, out) input: the base output (the base layer's own, in the matmuls' dtype;
    with dropout it is recomputed from the dropped input in the adapter's dtype) and the adapter's output."""
    if plan.strategy != "dora":
        return 0.0
    adapter = 2 if plan.amp else 4
    base = adapter if plan.lora_dropout else matmul_bytes(plan)
    return sum(out * (base + adapter) for name, (_, out) in shape.block_linears.items() if name in plan.lora_targets)


def dora_fixed_bytes(shape: ModelShape, plan: Plan, layer: int) -> float:
    """Bytes DoRA keeps per block whatever the batch: per adapted module the detached weight norm and the scale
    m / norm (fp32, out each), and m / norm - 1 where the base output requires grad (its input does); with
    dropout, where the input requires grad, the copy of the base weight that peft's recomputed F.linear keeps
    for the input's gradient: in x out in the adapter's compute dtype (bf16 under autocast; fp32 when the
    weights are 16-bit; none for fp32 weights, where the cast returns the weight itself)."""
    if plan.strategy != "dora" or not on_grad_path(plan, layer, shape.layers):
        return 0.0
    grad = grad_inputs(shape, plan, layer)
    copy = 2 if plan.amp else (4 if plan.weight_bytes != 4 else 0)
    total = 0.0
    for name, (fan_in, out) in shape.block_linears.items():
        if name in plan.lora_targets:
            needs_grad = grad[LINEAR_INPUTS[name]]
            total += 4 * out * (2 + needs_grad) + (fan_in * out * copy if plan.lora_dropout and needs_grad else 0)
    return total


def attention_bytes(shape: ModelShape, plan: Plan) -> int:
    """What SDPA keeps per token: q, k, v and its output, and a log-sum-exp per head (fp32). With a mask, k and v
    are repeated to the query heads first."""
    s, c = shape, matmul_bytes(plan)
    q = s.heads * s.head_dim
    kv = (s.heads if plan.mask and s.kv_heads < s.heads else s.kv_heads) * s.head_dim
    return (2 * q + 2 * kv) * c + 4 * s.heads


def linear_input_bytes(shape: ModelShape, plan: Plan, source: str, trains: bool, needs_grad: bool) -> float:
    """Bytes per token that the linears reading `source` keep of their input for their weight gradients: one
    shared tensor, a copy per linear that casts its input first (autocast to 16 bit, peft's cast to the fp32
    adapter), or per adapter with dropout its own dropped input (and the dropout's mask when `needs_grad`: the
    source requires grad, so its gradient passes back through the dropout)."""
    width, own = _source_width(shape, plan, source)
    copies, shared = 0.0, False
    for name in shape.linears_reading(source):
        adapted = name in plan.lora_targets
        if adapted and plan.lora_dropout:
            copies += dropout_bytes(plan, width, needs_grad)
        elif adapted and plan.amp:  # peft casts to the fp32 adapter, autocast back to 16 bit
            copies += width * 2
        elif adapted and own != 4:  # peft casts the input to the fp32 adapter's dtype
            copies += width * 4
        elif trains and plan.amp and own == 4:  # autocast casts an fp32 input for each matmul
            copies += width * 2
        elif trains or adapted:
            shared = True
    kept_by_attention = source == "attn" and needs_grad  # o_proj's input is SDPA's output, which SDPA keeps
    return copies + (width * own if shared and not kept_by_attention else 0.0)


def dropout_bytes(plan: Plan, width: int, needs_grad: bool) -> float:
    """Bytes per token one LoRA dropout adds: peft runs lora_A(dropout(x)) per adapted module, so each keeps its
    own dropped input (tokens, width) for lora_A's weight gradient (fp32 adapter dtype; its 16-bit cast under
    autocast), and, when x requires grad, the dropout's mask (`dropout_mask_bytes`). Nothing is shared between
    modules that read the same x, and x itself is no longer kept for the adapters."""
    return width * (2 if plan.amp else 4) + (width * dropout_mask_bytes(plan) if needs_grad else 0)


def _source_width(shape: ModelShape, plan: Plan, source: str) -> tuple[int, int]:
    """(elements per token, bytes per element) of a tensor of SOURCES: the norm outputs are in the residual
    stream's dtype, the attention output and the MLP product in the matmuls'."""
    s = shape
    return {"n1": (s.hidden, residual_bytes(plan)), "n2": (s.hidden, residual_bytes(plan)),
            "attn": (s.heads * s.head_dim, matmul_bytes(plan)), "mlp": (s.intermediate, matmul_bytes(plan))}[source]


def activation_bytes(shape: ModelShape, plan: Plan) -> float:
    """Activations kept through the forward pass (all layers, R.T tokens), the attention mask included."""
    s, tokens, r = shape, plan.rows * plan.seq_len, residual_bytes(plan)
    if plan.gradient_checkpointing:  # each block keeps only its input
        per_token = sum(s.hidden * r for i in range(s.layers) if on_grad_path(plan, i, s.layers))
    else:
        per_token = sum(layer_activation_bytes(s, plan, i) for i in range(s.layers))
    # The head's input, kept for its weight gradient (the fused loss makes that gradient in the forward pass)
    head_input = s.hidden * (2 if plan.amp else r) \
        if (plan.strategy == "full" or plan.head_trains) and not plan.fused_loss else 0
    final_norm = 4 * s.hidden + 4 + (s.hidden * r if plan.strategy == "full" else 0) + head_input
    fixed = 0 if plan.gradient_checkpointing else sum(dora_fixed_bytes(s, plan, i) for i in range(s.layers))
    return tokens * (per_token + final_norm) + attention_layers(s, plan) * mask_bytes(plan) + fixed


def attention_layers(shape: ModelShape, plan: Plan) -> int:
    """Blocks whose SDPA keeps its inputs (and so the mask) through the forward pass."""
    if plan.gradient_checkpointing:
        return 0
    return sum(on_grad_path(plan, i, shape.layers) and grad_inputs(shape, plan, i)["attn"]
               for i in range(shape.layers))


def mask_bytes(plan: Plan) -> float:
    """The (R, 1, T, T) attention mask SDPA converts from bool to the query's dtype, and keeps, in every layer."""
    return plan.rows * plan.seq_len**2 * matmul_bytes(plan) if plan.mask else 0.0


def autocast_copy_bytes(shape: ModelShape, plan: Plan) -> float:
    """Under mixed precision: the 16-bit copies of the weight matrices kept for the backward pass."""
    if not plan.amp:
        return 0.0
    s = shape
    layers = 0 if plan.gradient_checkpointing else sum(on_grad_path(plan, i, s.layers) for i in range(s.layers))
    head = s.vocab * s.hidden if plan.vocab_logits else 0
    return 2 * (layers * s.block_matmul_params + head)
