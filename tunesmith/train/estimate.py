"""`tunesmith estimate`: the peak memory and the speed of a training config, predicted before training.

Shapes come from the model's config alone (a model built on the meta device counts the parameters; no weight is
read), so it takes seconds for any hub model. Sizes follow what one training step allocates (P parameters, P_t
trainable, a micro-batch of R rows x T tokens whose N positions enter the loss, V the vocabulary):

    weights      P x dtype bytes; QLoRA: block linears in 4 bit (+ their quantisation scales), everything else
                 fp32 as peft's prepare_model_for_kbit_training leaves it; adapters fp32; a frozen reference
                 copy (DPO/KTO/GRPO/PPO with full or freeze and no align.precompute_ref) once more
    gradients    P_t x their dtype
    optimizer    AdamW: 2 x P_t x their dtype. The parameters are their own master copies: mixed precision
                 autocasts fp32 weights (so no extra copy), and bf16 weights are stepped in bf16
    activations  what autograd keeps for the backward pass, per layer per token (below) x layers x R.T
    autocast     under mixed precision, the 16-bit copy of every weight matrix a matmul keeps for its backward
    logits       the largest of the loss's moments (tunesmith/objectives/tokens.py, chunks of c = 4096 rows):
                 forward   (R,T,V) logits + (N,V) loss rows + fp32 log-softmax of one chunk (+ its fp32 input)
                 chunk bwd loss rows (+ their accumulated gradient when N > c) + 3 fp32 (c,V) buffers
                             (recomputed log-softmax, its incoming and outgoing gradient)
                 logits bwd gradient of the loss rows + gradient of the (R,T,V) logits
                 The logits are in the model dtype, but fp32 under mixed precision (accelerate converts outputs).
                 With the fused loss (SFT/clm, train.fused_loss; tunesmith/objectives/head.py) there are no
                 (R,T,V) logits: two fp32 chunks of 2^22 logits, the hidden states' gradient (N x H) and,
                 when the head trains, its weight's gradient (V x H, fp32) made in the forward pass.
    peak = max over the phases of a step (the optimizer state exists from the first step on):
      loss       weights + optimizer + activations + autocast + logits (+ gradients when grad_accum > 1)
      reference  weights + optimizer + activations + autocast + loss rows + a no-grad reference forward's logits
      update     weights + optimizer + gradients (+ one recomputed layer under gradient checkpointing)
      evaluation weights + optimizer + a validation batch's logits (no gradients), when there is validation data

Activations of one Llama-style block, bytes per token (H hidden, I intermediate, query n_h.d, keys n_kv.d; r the
residual stream's bytes = the model dtype (QLoRA: fp32), c a matmul output's bytes = 2 under autocast, else the
model dtype (QLoRA: its compute dtype)):
    RMSNorm x2     4H input upcast to fp32 (+ H.r normalised input when the norm weight trains)
    linear inputs  a norm output (H.r) is kept once when a consumer needs it for a weight gradient (a trained
                   weight or an adapter); a consumer that casts (autocast to 16 bit, peft's cast to fp32
                   adapters) keeps its own copy: up to 3 (q, k, v) and 2 (gate, up)
    attention      SDPA keeps q, k, v and its output ((2 n_h + 2 n_kv) d.c; o_proj reads that output) and a
                   log-sum-exp (4 n_h); with an attention mask (padding) k and v are repeated to n_h heads and
                   each layer also keeps the (R, 1, T, T) mask converted to c bytes (R.T^2.c per layer). Packed
                   and padding-free rows (one row of R.T tokens) have no mask: attention runs per example
    MLP            3 I.c (gate, up, silu(gate)) + I.c for down_proj's input when it needs it
    LoRA           r_lora per adapted module (lora_A's output), in fp32 (2 bytes under autocast)
    final norm     4H (+ H.r when it trains) and the LM head's input when the head trains
Layers below every trained weight keep nothing. With gradient checkpointing each block keeps only its input (H.r)
and one block is rebuilt at a time in the backward pass. Other architectures are estimated with the same block.
tests/test_estimate.py checks these against the tensors autograd saves and the tensors alive in real steps.

Speed: FLOPs per token = 6 x matmul parameters (4 x with frozen weights: no weight gradients; + 2 x under gradient
checkpointing) + causal attention 6 x L x n_h.d x T (fwd + bwd), at the device's peak (GPU: a table of dense
16-bit peaks; CPU: a matmul measured now) times an assumed utilisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import Config, save_config
from tunesmith.errors import ConfigError
from tunesmith.model.build import architecture, build_tokenizer

MiB = 2**20
LOSS_CHUNK = 4096  # rows per chunk of tunesmith.objectives.tokens (its chunk_size default)
# Which tensor of a Llama-style block feeds each linear: norm outputs (n1, n2), attention output, MLP product.
LINEAR_INPUTS = {"q_proj": "n1", "k_proj": "n1", "v_proj": "n1", "qkv_proj": "n1", "c_attn": "n1",
                 "o_proj": "attn", "gate_proj": "n2", "up_proj": "n2", "gate_up_proj": "n2", "c_fc": "n2",
                 "down_proj": "mlp", "c_proj": "mlp"}
# Dense 16-bit tensor-core peaks (FLOP/s), by a name fragment of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12,
                 "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12,
                 "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}
GPU_UTILISATION = 0.4  # model FLOPs utilisation assumed for a well-fed GPU
CPU_UTILISATION = 0.5  # share of the measured matmul rate a whole training step reaches on CPU


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read from a model config (plus its meta-device parameter counts)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    block_params: int  # one block
    other_params: int  # final norm and anything else outside the blocks and the embeddings
    block_linears: dict[str, tuple[int, int]]  # short name -> (in, out) of one block's linears

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.block_params + self.other_params

    @property
    def matmul_params(self) -> int:
        """Parameters used in matmuls: the blocks' linears and the LM head (the embedding is a lookup)."""
        return self.layers * sum(i * o for i, o in self.block_linears.values()) + self.vocab * self.hidden


@dataclass(frozen=True)
class Plan:
    """How the config trains, as plain numbers: everything the estimate depends on besides the model shape."""

    rows: int  # sequences in one micro-batch forward (pairs: chosen + rejected; RL: prompts x group)
    seq_len: int  # padded length of the longest micro-batch
    loss_rows: int  # positions whose logits enter the loss (N)
    mask: bool  # an attention mask reaches SDPA (padding or packing)
    weight_bytes: int  # model dtype
    amp: bool  # train.mixed_precision: 16-bit autocast
    strategy: str
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ()
    quant_bytes: float = 0.5  # QLoRA bytes per 4-bit weight, scales included
    compute_bytes: int = 2  # QLoRA matmul dtype
    freeze_layers: int = 0  # strategy freeze: the last N blocks train
    head_trains: bool = False  # strategy freeze/head: the LM head trains
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    reference_copy: bool = False  # a frozen copy of the model
    reference_pass: bool = False  # a no-grad reference forward while the policy's graph is alive
    vocab_logits: bool = True  # False for a reward model (a scalar head)
    eval_rows: int = 0  # rows of a validation batch (0: no validation data)
    source: str = "data.max_seq_len"  # where seq_len and loss_rows come from
    logit_positions: int = 0  # positions the LM head computes (`answer_logits` skips the prompt); 0: seq_len
    fused_loss: bool = False  # head and loss fused on the loss positions (no logits tensor)


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


# ---------------------------------------------------------------------------------------------------
# Shapes


def model_shape(config, vocab: int | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a `transformers` config; parameters counted on a meta-device model (no memory, no weights).
    `vocab`: the tokenizer's size, when it outgrows the embeddings (training then resizes them)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.strategies import transformer_blocks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    blocks = transformer_blocks(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in blocks[0].parameters())
    linears = {name.rsplit(".", 1)[-1]: _in_out(m) for name, m in blocks[0].named_modules() if _in_out(m)}
    hidden, config_vocab = embed.shape[1], embed.shape[0]
    heads = _attr(config, "num_attention_heads", "n_head")
    return ModelShape(
        model_type=config.model_type, layers=len(blocks), hidden=hidden,
        intermediate=_attr(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        heads=heads, kv_heads=_attr(config, "num_key_value_heads", default=heads) or heads,
        head_dim=_attr(config, "head_dim", default=hidden // heads) or hidden // heads,
        vocab=max(vocab or 0, config_vocab), tied=tied, block_params=block,
        other_params=total - len(blocks) * block - config_vocab * hidden * (1 if tied else 2),
        block_linears=linears,
    )


def _in_out(module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return tuple(module.weight.shape)
    return None


def _attr(config, *names: str, default=None):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


# ---------------------------------------------------------------------------------------------------
# Memory


def model_params(shape: ModelShape, plan: Plan) -> int:
    """All parameters; a reward model has a one-output score head in place of the LM head."""
    untied_head = 0 if shape.tied else shape.vocab * shape.hidden
    return shape.params if plan.vocab_logits else shape.params - untied_head + shape.hidden


def trainable_params(shape: ModelShape, plan: Plan) -> int:
    s = shape
    if plan.strategy == "full":
        return model_params(s, plan)
    if plan.strategy in ("lora", "dora", "qlora"):
        per_block = sum(plan.lora_r * (i + o) + (o if plan.strategy == "dora" else 0)
                        for name, (i, o) in s.block_linears.items() if name in plan.lora_targets)
        return s.layers * per_block
    return plan.freeze_layers * s.block_params + (s.vocab * s.hidden if plan.head_trains else 0)


def weight_bytes(shape: ModelShape, plan: Plan) -> float:
    s = shape
    if plan.strategy != "qlora":
        base = model_params(s, plan) * plan.weight_bytes
    else:
        linear = s.layers * sum(i * o for i, o in s.block_linears.values())
        base = linear * plan.quant_bytes + (model_params(s, plan) - linear) * 4
    adapters = trainable_params(s, plan) * 4 if plan.strategy in ("lora", "dora", "qlora") else 0
    return base + adapters


def param_dtype_bytes(plan: Plan) -> int:
    """Bytes of a trainable parameter (and of its gradient and AdamW states): adapters are fp32."""
    return 4 if plan.strategy in ("lora", "dora", "qlora") else plan.weight_bytes


def layer_trains(plan: Plan, layer: int, layers: int) -> bool:
    return plan.strategy == "full" or (plan.strategy == "freeze" and layer >= layers - plan.freeze_layers)


def on_grad_path(plan: Plan, layer: int, layers: int) -> bool:
    """Whether gradients flow through this block (something at or below it trains)."""
    if plan.strategy in ("freeze", "head"):
        return plan.strategy == "freeze" and layer >= layers - plan.freeze_layers
    return True


def layer_activation_bytes(shape: ModelShape, plan: Plan, layer: int = 1) -> float:
    """Bytes autograd keeps per token for one block (the module docstring gives the formula)."""
    s, L = shape, shape.layers
    if not on_grad_path(plan, layer, L):
        return 0.0
    r, c = residual_bytes(plan), matmul_bytes(plan)
    trains = layer_trains(plan, layer, L)
    # The block's input needs a gradient itself when the embeddings train or a block below is on the path.
    input_grad = plan.strategy == "full" or (layer > 0 and on_grad_path(plan, layer - 1, L))
    q, kv = s.heads * s.head_dim, (s.heads if plan.mask and s.kv_heads < s.heads else s.kv_heads) * s.head_dim
    total = 4 * s.hidden * (2 if input_grad else 1) + 8  # the two norms' fp32 inputs and 1/rms
    total += 2 * s.hidden * r if trains else 0  # normalised inputs kept for the norm weights' gradients
    total += (2 * q + 2 * kv) * c + 4 * s.heads + 3 * s.intermediate * c
    widths = {"n1": (s.hidden, r), "n2": (s.hidden, r), "attn": (q, c), "mlp": (s.intermediate, c)}
    for source, (width, own_bytes) in widths.items():
        users = [n for n in s.block_linears if LINEAR_INPUTS.get(n) == source]
        total += _linear_inputs(plan, users, width, own_bytes, trains)
    adapted = [n for n in s.block_linears if n in plan.lora_targets]
    total += len(adapted) * plan.lora_r * (2 if plan.amp else 4)
    return total


def _linear_inputs(plan: Plan, users: list[str], width: int, own_bytes: int, trains: bool) -> float:
    """Bytes per token that the linears reading one tensor (of `own_bytes` per element) keep of it for their
    weight gradients: one shared tensor, or a copy per linear that casts its input first."""
    copies, shared = 0.0, False
    for name in users:
        if name in plan.lora_targets and plan.amp:  # peft casts to the fp32 adapter, autocast back to 16 bit
            copies += width * 2
        elif name in plan.lora_targets and own_bytes != 4:  # peft casts the input to the fp32 adapter's dtype
            copies += width * 4
        elif trains and plan.amp and own_bytes == 4:  # autocast casts an fp32 input for each matmul
            copies += width * 2
        elif trains or name in plan.lora_targets:
            shared = True
    # o_proj reads the SDPA output, which SDPA keeps anyway.
    attention_output = bool(users) and LINEAR_INPUTS[users[0]] == "attn"
    return copies + (width * own_bytes if shared and not attention_output else 0.0)


def residual_bytes(plan: Plan) -> int:
    return 4 if plan.strategy == "qlora" else plan.weight_bytes


def matmul_bytes(plan: Plan) -> int:
    if plan.amp:
        return 2
    return plan.compute_bytes if plan.strategy == "qlora" else plan.weight_bytes


def activation_bytes(shape: ModelShape, plan: Plan) -> float:
    """Activations kept through the forward pass (all layers, R.T tokens), the attention mask included."""
    s, tokens = shape, plan.rows * plan.seq_len
    r = residual_bytes(plan)
    if plan.gradient_checkpointing:
        per_token = sum(s.hidden * r for i in range(s.layers) if on_grad_path(plan, i, s.layers))
    else:
        per_token = sum(layer_activation_bytes(s, plan, i) for i in range(s.layers))
    # The head's input, kept for its weight gradient (the fused loss makes that gradient in the forward pass)
    head_input = s.hidden * (2 if plan.amp else r) \
        if (plan.strategy == "full" or plan.head_trains) and not plan.fused_loss else 0
    final_norm = 4 * s.hidden + (s.hidden * r if plan.strategy == "full" else 0) + head_input
    layers = 0 if plan.gradient_checkpointing else sum(on_grad_path(plan, i, s.layers) for i in range(s.layers))
    return tokens * (per_token + final_norm) + layers * mask_bytes(plan)


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
    return 2 * (layers * sum(i * o for i, o in s.block_linears.values()) + head)


def logits_bytes(shape: ModelShape, plan: Plan) -> dict[str, float]:
    """Bytes of the logits and the chunked loss at their forward, chunk-backward and logits-backward moments."""
    if not plan.vocab_logits:
        return {"forward": 0.0, "chunk backward": 0.0, "logits backward": 0.0}
    if plan.fused_loss:
        return fused_loss_bytes(shape, plan)
    V, n, b = shape.vocab, plan.loss_rows, _logits_dtype_bytes(plan)
    full = plan.rows * (plan.logit_positions or plan.seq_len) * V
    chunk = min(n, LOSS_CHUNK)
    rows = n * V * b  # logits[keep]: the loss rows, kept for the backward
    accumulated = rows if n > LOSS_CHUNK else 0.0  # their gradient, summed over chunks
    upcast = chunk * V * 4 if b != 4 else 0.0
    forward = max(full * (b + (2 if plan.amp else 0)), full * b + rows + chunk * V * 4 + upcast)
    return {"forward": forward,
            "chunk backward": rows + accumulated + max(3 * chunk * V * 4, chunk * V * b + n * V * b),
            "logits backward": n * V * b + full * b + (full * 2 if plan.amp else 0)}


def fused_loss_bytes(shape: ModelShape, plan: Plan) -> dict[str, float]:
    """The fused head + loss: one chunk's logits and log-probabilities (fp32), the hidden states' gradient and
    the head's weight gradient (fp32, when the head trains) made in the forward pass, and in the backward pass
    those gradients scaled (and cast to the weights' dtype)."""
    from tunesmith.objectives.head import CHUNK_ELEMENTS

    s, n = shape, plan.loss_rows
    hidden = n * s.hidden * (4 if plan.amp else residual_bytes(plan))
    head = s.vocab * s.hidden * 4 if plan.strategy == "full" or plan.head_trains else 0.0
    chunk = 2 * min(n * s.vocab, CHUNK_ELEMENTS) * 4
    return {"forward": chunk + hidden + head,
            "chunk backward": 2 * hidden + head + (s.vocab * s.hidden * param_dtype_bytes(plan) if head else 0.0),
            "logits backward": 0.0}


def _logits_dtype_bytes(plan: Plan) -> int:
    """fp32 under mixed precision (accelerate converts the outputs) and for QLoRA (its LM head is fp32)."""
    return 4 if plan.amp or plan.strategy == "qlora" else plan.weight_bytes


def estimate_memory(shape: ModelShape, plan: Plan) -> Estimate:
    """Components and the peak of one training step (bytes) and the FLOPs per token."""
    s = shape
    trainable = trainable_params(s, plan)
    weights = weight_bytes(s, plan)
    reference = weights if plan.reference_copy else 0.0
    grads, optimizer = trainable * param_dtype_bytes(plan), 2 * trainable * param_dtype_bytes(plan)
    activations, copies = activation_bytes(s, plan), autocast_copy_bytes(s, plan)
    loss = logits_bytes(s, plan)
    held = weights + reference + optimizer + activations + copies + (grads if plan.grad_accum > 1 else 0)
    phases = {"loss": held + max(loss.values())}
    if plan.reference_pass:  # the policy's loss rows stay while the reference makes its logits
        policy_rows = plan.loss_rows * s.vocab * _logits_dtype_bytes(plan) if plan.vocab_logits else 0.0
        # A frozen copy is not prepared by accelerate: it runs without autocast.
        reference_plan = dataclasses.replace(plan, amp=plan.amp and not plan.reference_copy)
        phases["reference"] = held + policy_rows + logits_bytes(s, reference_plan)["forward"]
    recompute = 0.0
    if plan.gradient_checkpointing:  # one block rebuilt, with its weights' autocast copies
        recompute = plan.rows * plan.seq_len * layer_activation_bytes(s, plan, s.layers - 1) + mask_bytes(plan) + \
            (2 * sum(i * o for i, o in s.block_linears.values()) if plan.amp else 0)
    phases["update"] = weights + reference + optimizer + grads + recompute
    evaluation = 0.0
    if plan.eval_rows and plan.vocab_logits:  # a validation batch: no gradients, its own number of rows
        batch = dataclasses.replace(plan, rows=plan.eval_rows, loss_rows=plan.loss_rows * plan.eval_rows // plan.rows)
        evaluation = logits_bytes(s, batch)["forward"]
        phases["evaluation"] = weights + reference + optimizer + evaluation
    at_peak = {"loss": ["weights", "optimizer state", "activations", "logits and loss"]
               + (["gradients"] if plan.grad_accum > 1 else []),
               "reference": ["weights", "optimizer state", "activations", "logits and loss"],
               "update": ["weights", "optimizer state", "gradients"],
               "evaluation": ["weights", "optimizer state", "validation logits"]}[max(phases, key=phases.get)]
    components = {"weights": weights, "reference model": reference, "gradients": grads,
                  "optimizer state": optimizer, "activations": activations, "autocast weight copies": copies,
                  "logits and loss": max(loss.values()), "validation logits": evaluation}
    if reference:
        at_peak.append("reference model")
    if copies and "activations" in at_peak:
        at_peak.append("autocast weight copies")
    return Estimate(components, phases, at_peak, flops_per_token(s, plan), trainable)


# ---------------------------------------------------------------------------------------------------
# Speed


def flops_per_token(shape: ModelShape, plan: Plan) -> float:
    """Training FLOPs per position: forward 2 x matmul params; backward 2 x for input gradients where gradients
    flow and 2 x for weight gradients where weights train; causal attention 2 n_h.d.T forward, twice that
    backward; one more forward of each block under gradient checkpointing."""
    s, q = shape, shape.heads * shape.head_dim
    per_layer, attention = 2 * sum(i * o for i, o in s.block_linears.values()), 2 * q * plan.seq_len
    total = 0.0
    for layer in range(s.layers):
        path, trains = on_grad_path(plan, layer, s.layers), layer_trains(plan, layer, s.layers)
        total += per_layer * (1 + path + trains) + attention * (1 + 2 * path)
        if plan.gradient_checkpointing and path:
            total += per_layer + attention
    head = 2 * s.vocab * s.hidden if plan.vocab_logits else 0
    any_path = any(on_grad_path(plan, i, s.layers) for i in range(s.layers))
    return total + head * (1 + any_path + (plan.strategy == "full" or plan.head_trains))


def device_flops(compute: torch.dtype) -> tuple[str, float, float]:
    """(device name, FLOP/s, assumed utilisation): a GPU's 16-bit peak from the table, else a matmul measured now
    (CPUs, fp32 on GPUs, GPUs not in the table)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        if peak is not None and compute != torch.float32:
            return name, peak, GPU_UTILISATION
        return f"{name} (matmul measured)", matmul_flops(compute, "cuda"), GPU_UTILISATION
    return f"CPU, {torch.get_num_threads()} threads (matmul measured)", matmul_flops(compute, "cpu"), CPU_UTILISATION


def matmul_flops(dtype: torch.dtype, device: str, n: int = 1024, seconds: float = 0.3) -> float:
    """The best rate of an n x n x n matmul over ~`seconds` (after one warm-up)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up
    times: list[float] = []
    while sum(times) < seconds and len(times) < 20:
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


# ---------------------------------------------------------------------------------------------------
# From a config


def plan_from_config(cfg: Config, shape: ModelShape, batch: dict | None = None) -> tuple[Plan, list[str]]:
    """The Plan of a config (and notes on what is approximated); `batch` is `cached_batch`'s answer or None."""
    from tunesmith.model.load import resolve_dtype
    from tunesmith.model.strategies import ADAPTER_STRATEGIES, DEFAULT_TARGET_MODULES
    from tunesmith.objectives import PREFERENCE_OBJECTIVES, REFERENCE_OBJECTIVES, RL_OBJECTIVES

    t, st, a, notes = cfg.train, cfg.strategy, cfg.align, []
    if st.name == "features":
        raise ConfigError("strategy.name: features trains no weights in the loop; there is no step to estimate")
    rows = t.micro_batch_size * (2 if t.objective in PREFERENCE_OBJECTIVES else 1)
    seq_len = cfg.data.max_seq_len
    # Packed and padding-free rows run attention per example (no mask) under SDPA
    varlen = (cfg.data.pack or cfg.data.padding_free) and cfg.model.attn_implementation == "sdpa"
    loss_rows, mask, source = rows * (seq_len - 1), (cfg.data.pack or rows > 1) and not varlen, "data.max_seq_len"
    flat = cfg.data.padding_free and t.objective in ("sft", "clm")
    if flat:  # one row of every example of the micro-batch
        rows, seq_len = 1, rows * seq_len
    logit_positions = 0
    if t.objective in RL_OBJECTIVES:
        rows, seq_len = t.micro_batch_size * a.group_size, seq_len + a.max_new_tokens
        loss_rows = rows * a.max_new_tokens
        notes.append("RL: the update is estimated; sampling (its KV cache) is not")
    elif batch is not None:
        seq_len, loss_rows, source = batch["seq_len"], batch["loss_rows"], "prepared data"
        mask = batch["mask"] and not varlen
        if flat:
            seq_len = batch["flat_len"]
        # The loss objectives ask for logits from the batch's first answer token on (`answer_logits`); prompt
        # and prefix tuning prepend virtual tokens and ReFT wraps the model, so they keep every position.
        if st.name not in ("prompt_tuning", "prefix_tuning", "reft"):
            logit_positions = seq_len - batch["prompt_floor"]
    targets = st.lora.target_modules
    if targets == "auto":
        targets = DEFAULT_TARGET_MODULES.get(shape.model_type, "all-linear")
    targets = tuple(shape.block_linears) if targets == "all-linear" else tuple(targets)
    if st.name == "dora":
        notes.append("DoRA keeps more activations than LoRA (each adapted module's base and adapter outputs); "
                     "they are not modelled: expect a higher peak")
    if st.name in ("head", "prompt_tuning", "prefix_tuning", "reft"):
        notes.append(f"strategy {st.name}: estimated as frozen weights (its own few parameters not counted)")
    reference = (t.objective in REFERENCE_OBJECTIVES and not a.precompute_ref and st.name not in ADAPTER_STRATEGIES
                 and not (t.objective == "grpo" and not a.kl_beta))
    quant = 0.5 + (1 / 64 + 4 / (64 * 256) if st.quant.double_quant else 4 / 64)  # NF4 + absmax per 64 weights
    plan = Plan(
        rows=rows, seq_len=seq_len, loss_rows=loss_rows, mask=mask, logit_positions=logit_positions,
        weight_bytes=torch.finfo(resolve_dtype(cfg.model.dtype)).bits // 8, amp=t.mixed_precision != "no",
        strategy=st.name if st.name in ("full", "freeze", "lora", "dora", "qlora", "head") else "prompt",
        lora_r=st.lora.r, lora_targets=targets if st.name in ADAPTER_STRATEGIES else (), quant_bytes=quant,
        compute_bytes=torch.finfo(resolve_dtype(st.quant.compute_dtype)).bits // 8,
        freeze_layers=st.freeze.last_n_layers if st.name == "freeze" else 0,
        head_trains=st.name == "head" or (st.name == "freeze" and "lm_head" in st.freeze.modules),
        gradient_checkpointing=t.gradient_checkpointing, grad_accum=t.grad_accum, reference_copy=reference,
        reference_pass=t.objective in ("dpo", "kto") and not a.precompute_ref,
        vocab_logits=t.objective != "reward", source=source,
        fused_loss=t.fused_loss and t.objective in ("sft", "clm") and st.name not in ("prompt_tuning",
                                                                                      "prefix_tuning", "reft"),
        eval_rows=cfg.eval.batch_size * rows // t.micro_batch_size if cfg.data.validation or cfg.data.split.validation
        else 0,
    )
    return plan, notes


def cached_batch(cfg: Config, tokenizer) -> dict | None:
    """The longest micro-batch of the training data when it is already prepared (in the cache): its padded
    length, an upper bound of its loss positions (the B largest counts of each side), whether it is padded, and
    the fewest prompt positions any batch can skip (the shortest prompt of the data, so that the logits' length
    is an upper bound)."""
    import numpy as np
    import pyarrow.compute as pc

    from tunesmith.data.build import cache_dir, clean_from_config, options_from_config, sources_from_config
    from tunesmith.data.pipeline import fingerprint

    key = fingerprint(tokenizer, sources_from_config(cfg), options_from_config(cfg), clean_from_config(cfg))
    path = cache_dir(cfg) / key / "train"
    if not path.is_dir():
        return None
    from datasets import load_from_disk

    table = load_from_disk(str(path)).data
    b = cfg.train.micro_batch_size
    sides = [("input_ids", "labels")] + ([("rejected_ids", "rejected_labels")]
                                         if "rejected_ids" in table.column_names else [])
    lengths, losses, floors = [], [], []
    for ids, labels in sides:
        column = table.column(labels).combine_chunks()
        lengths.append(pc.list_value_length(table.column(ids)).fill_null(0).to_numpy(zero_copy_only=False))
        values = column.flatten().to_numpy(zero_copy_only=False)
        starts = column.offsets.to_numpy()[:-1]
        counted = np.add.reduceat(values != -100, starts) if len(values) else np.zeros(len(starts))
        first = values[np.minimum(starts, len(values) - 1)] != -100  # label 0 is never a target after the shift
        losses.append(np.sort(counted - first)[::-1][:b].sum())
        supervised = np.flatnonzero(values != -100)  # the first supervised position of each row, minus one
        if len(supervised):
            rows_seen, first_index = np.unique(np.searchsorted(starts, supervised, side="right") - 1,
                                               return_index=True)
            floors.append(int(max((supervised[first_index] - starts[rows_seen]).min() - 1, 0)))
    top = np.sort(np.concatenate(lengths))[::-1][: b * len(sides)]
    seq_len = int(top[0])
    packed = "position_ids" in table.column_names and table.column("position_ids").null_count < len(table)
    return {"seq_len": seq_len, "loss_rows": int(min(len(top) * (seq_len - 1), sum(losses))),
            "flat_len": int(np.sort(lengths[0])[::-1][:b].sum()),  # padding-free: the b longest end to end
            "mask": bool(packed or (top != seq_len).any()), "prompt_floor": 0 if packed or not floors else min(floors)}


# ---------------------------------------------------------------------------------------------------
# The command


def estimate_command(cfg: Config, measure: bool = False) -> dict:
    """Print the estimate of `cfg` as a table and write `estimate.json` to train.output_dir; with `measure`,
    also run a few steps in a fresh process and report the measured peak next to the estimate."""
    m = cfg.model
    tokenizer, _ = build_tokenizer(cfg)
    if measure:  # training prepares the data anyway; prepared, its longest micro-batch is known
        from tunesmith.data.build import prepare_from_config

        prepare_from_config(cfg, tokenizer)
    config = architecture(cfg, tokenizer)
    shape = model_shape(config, len(tokenizer), m.trust_remote_code)
    plan, notes = plan_from_config(cfg, shape, cached_batch(cfg, tokenizer))
    est = estimate_memory(shape, plan)
    est.notes += notes
    compute = torch.bfloat16 if plan.amp or plan.weight_bytes == 2 else torch.float32
    device, rate, utilisation = device_flops(compute)
    report = {
        "config": cfg.model.name_or_path or f"model.init ({m.init.family})", "model": dataclasses.asdict(shape) | {"params": shape.params},
        "plan": dataclasses.asdict(plan), "trainable_params": est.trainable,
        "components_bytes": est.components, "phases_bytes": est.phases, "peak_bytes": est.peak,
        "peak_phase": est.peak_phase, "at_peak": est.at_peak, "flops_per_token": est.flops_per_token,
        "device": device, "device_flops": rate, "utilisation": utilisation,
        "tokens_per_s": rate * utilisation / est.flops_per_token, "advice": advice(cfg, shape, plan, est),
        "notes": est.notes,
    }
    if measure:
        report["measured"] = measure_peak(cfg)
        report["measured"]["relative_error"] = est.peak / report["measured"]["peak_bytes"] - 1
    print(format_table(report))
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.json").write_text(json.dumps(report, indent=1))
    return report


def advice(cfg: Config, shape: ModelShape, plan: Plan, est: Estimate) -> str:
    """What to change to shrink the biggest component at the peak, with the peak it would give."""
    biggest = max(est.at_peak, key=est.components.get)
    half_batch = {"rows": max(1, plan.rows // 2), "loss_rows": max(1, plan.loss_rows // 2)}
    lora = {"strategy": "lora", "lora_targets": tuple(n for n in shape.block_linears if n in LINEAR_INPUTS)}
    options = {
        "weights": [("model.dtype=bf16", {"weight_bytes": 2}), ("strategy.name=qlora", lora | {"strategy": "qlora"})],
        "gradients": [("strategy.name=lora", lora)], "optimizer state": [("strategy.name=lora", lora)],
        "activations": [("train.gradient_checkpointing=true", {"gradient_checkpointing": True})],
        "autocast weight copies": [("train.gradient_checkpointing=true", {"gradient_checkpointing": True})],
        "logits and loss": [(f"data.max_seq_len={plan.seq_len // 2}", {"seq_len": plan.seq_len // 2,
                                                                       "loss_rows": plan.loss_rows // 2})],
        "reference model": [("align.precompute_ref=true", {"reference_copy": False, "reference_pass": False})],
        "validation logits": [(f"eval.batch_size={max(1, cfg.eval.batch_size // 2)}",
                               {"eval_rows": max(1, plan.eval_rows // 2)})],
    }[biggest]
    if cfg.train.micro_batch_size > 1 and biggest in ("activations", "logits and loss"):
        options.append((f"train.micro_batch_size={cfg.train.micro_batch_size // 2} "
                        f"train.grad_accum={cfg.train.grad_accum * 2}",
                        half_batch | {"grad_accum": plan.grad_accum * 2}))
    scored = [(estimate_memory(shape, dataclasses.replace(plan, **change)).peak, text)
              for text, change in options if not all(getattr(plan, k) == v for k, v in change.items())]
    if not scored:
        return f"{biggest} is the biggest part of the peak"
    peak, text = min(scored)
    return f"{biggest} is the biggest part of the peak: {text} would give {peak / MiB:,.0f} MiB"


def format_table(report: dict) -> str:
    s, p = report["model"], report["plan"]
    lines = [f"model {report['config']}: {s['model_type']}, {s['layers']} layers, hidden {s['hidden']}, vocabulary "
             f"{s['vocab']:,}; {s['params'] / 1e6:,.1f}M parameters, {report['trainable_params'] / 1e6:,.2f}M "
             f"trainable ({p['strategy']})",
             f"longest micro-batch: {p['rows']} rows x {p['seq_len']} tokens, {p['loss_rows']:,} loss positions "
             f"(from {p['source']}); weights {8 * p['weight_bytes']}-bit, mixed precision "
             f"{'on' if p['amp'] else 'off'}, gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}",
             "", f"{'component':<24}{'MiB':>12}  at the peak", "-" * 48]
    for name, size in report["components_bytes"].items():
        if size:
            lines.append(f"{name:<24}{size / MiB:>12,.1f}  {'yes' if name in report['at_peak'] else 'no'}")
    lines += ["-" * 48, f"{'peak':<24}{report['peak_bytes'] / MiB:>12,.1f}  ({report['peak_phase']} phase)"]
    if "measured" in report:
        m = report["measured"]
        lines.append(f"{'measured peak':<24}{m['peak_bytes'] / MiB:>12,.1f}  ({m['method']}); estimate "
                     f"{m['relative_error']:+.1%}")
    lines += ["", f"speed: ~{report['tokens_per_s']:,.0f} tokens/s ({report['flops_per_token'] / 1e9:,.3g} GFLOP "
              f"per token; {report['device']}: {report['device_flops'] / 1e12:,.2f} TFLOP/s x "
              f"{report['utilisation']:.0%} utilisation)"]
    if "measured" in report and report["measured"].get("tokens_per_s"):
        lines[-1] += f"; measured {report['measured']['tokens_per_s']:,.0f} non-padding tokens/s"
    lines.append(f"to lower it: {report['advice']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Measuring


def measure_peak(cfg: Config, steps: int = 3, malloc_mmap_threshold: int | None = 65536) -> dict:
    """Train `steps` optimizer steps of `cfg` (into a temporary directory) in a fresh process and return its peak
    memory above what that process held just before training (see `_measure_child`).

    On CPU glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB as tensors are freed) in
    its heap, so the resident set stays above the tensors alive by whatever the heap retained. A fixed threshold
    (`malloc_mmap_threshold` bytes; None: glibc's default) maps every tensor buffer on its own and unmaps it when
    freed: the resident set then follows the tensors alive, as CUDA's max_memory_allocated does."""
    with tempfile.TemporaryDirectory(prefix="tunesmith-estimate-") as tmp:
        run = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, output_dir=str(Path(tmp) / "run"), max_steps=steps,
                                           resume=False, save_every=None),
            tracking=dataclasses.replace(cfg.tracking, progress_bar=False, sinks=[], log_level="warning"))
        save_config(run, Path(tmp) / "config.yaml")
        result = Path(tmp) / "measured.json"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if malloc_mmap_threshold is not None and not torch.cuda.is_available():
            env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
        done = subprocess.run([sys.executable, "-m", "tunesmith.train.estimate", str(Path(tmp) / "config.yaml"),
                               str(result)], capture_output=True, text=True, env=env)
        if done.returncode:
            from tunesmith.errors import TunesmithError

            raise TunesmithError(f"--measure: the training run failed:\n{done.stderr[-4000:]}")
        measured = json.loads(result.read_text())
        if "MALLOC_MMAP_THRESHOLD_" in env:
            measured["method"] += f" (glibc mmap threshold {int(env['MALLOC_MMAP_THRESHOLD_']) // 1024} KiB)"
        return measured


def _measure_child(config_path: str, result_path: str) -> None:
    """Prepare the data, import the model's code, then train with the peak counter reset; the peak minus the memory
    held at that moment is what training added: weights, gradients, optimizer, activations, logits, the memory
    probe, evaluation and checkpoint writing; not the interpreter, libraries, tokenizer or prepared data.
    CPU: the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs), allocator overhead
    included; CUDA: torch.cuda.max_memory_allocated (tensors only, not the caching allocator's reserve)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from tunesmith.config import load_config
    from tunesmith.data.build import prepare_from_config
    from tunesmith.track.metrics import read_metrics
    from tunesmith.train.run import train

    cfg = load_config(config_path)
    tokenizer = build_tokenizer(cfg)[0]
    prepare_from_config(cfg, tokenizer)
    config = architecture(cfg, tokenizer)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the model's code
    _warm_up(cfg.train.mixed_precision != "no")
    cuda = torch.cuda.is_available()
    base = torch.cuda.memory_allocated() if cuda else _proc_status("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    train(cfg)
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_status("VmHWM")
    rates = [r["tokens_per_s"] for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
             if "tokens_per_s" in r][1:]  # the first step pays for warm-up
    method = "CUDA max_memory_allocated" if cuda else "CPU peak RSS minus RSS before training"
    Path(result_path).write_text(json.dumps({"peak_bytes": peak - base, "baseline_bytes": base, "method": method,
                                             "tokens_per_s": sum(rates) / len(rates) if rates else None}))


def _warm_up(amp: bool) -> None:
    """Load the libraries training uses and run each kind of kernel once on tiny tensors, so that their code,
    thread pools and the plotting library are resident before the baseline is taken."""
    import matplotlib.pyplot  # noqa: F401  (the data report's and the loss curve's plots)
    import peft  # noqa: F401
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        layer = torch.nn.Linear(64, 64, device=device, dtype=dtype)
        x = torch.randn(2, 8, 64, device=device, dtype=dtype, requires_grad=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            q = layer(x).view(2, 8, 4, 16).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True).reshape(16, 64)
            loss = F.cross_entropy(out.float(), torch.zeros(16, dtype=torch.long, device=device))
        loss.backward()
        torch.optim.AdamW(layer.parameters(), fused=True).step()


def _proc_status(name: str) -> int:
    """A memory field of /proc/self/status, in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1)) * 1024


if __name__ == "__main__":
    _measure_child(*sys.argv[1:])
