"""`tunesmith estimate`: the peak memory and the speed of a training config, predicted before training.

Shapes come from the model's config alone: by formula from config.json for the architectures config_shape.py
knows, else counted on a model built on the meta device; no weight is read. With the CPU's rate for the model's
block kept from an earlier estimate (cpu_rate.py), it imports neither torch nor transformers and takes about a
second. Sizes follow what one training step allocates (P parameters, P_t
trainable, a micro-batch of R rows x T tokens whose N positions enter the loss, V the vocabulary):

    weights      P x dtype bytes; QLoRA: block linears in 4 bit (+ their quantisation scales), everything else
                 fp32 as peft's prepare_model_for_kbit_training leaves it, and on a CPU, for a checkpoint stored
                 and loaded in fp32, the whole memory-mapped checkpoint (P x 4) in place of that fp32 rest: the
                 unquantised weights keep the file mapped, and quantising read all of it; adapters fp32; a frozen
                 reference copy (DPO/KTO/GRPO/PPO with full or freeze and no align.precompute_ref) once more
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
                 (R,T,V) logits: one fp32 chunk of max(2^23 / V, 128) rows of logits (+ their 16-bit matmul
                 result under autocast), the hidden states' gradient (N x H) and, when the head trains, its
                 weight's gradient (V x H, fp32) made in the forward pass.
    peak = max over the phases of a step (the optimizer state exists from the first step on):
      loss       weights + optimizer + activations + autocast + logits (+ gradients when grad_accum > 1)
      reference  weights + optimizer + activations + autocast + loss rows + a no-grad reference forward's logits
      update     weights + optimizer + gradients (+ one recomputed layer under gradient checkpointing)
      evaluation weights + optimizer + a validation batch's logits (no gradients), when there is validation data

Activations of one Llama-style block, bytes per token (H hidden, I intermediate, query n_h.d, keys n_kv.d; r the
residual stream's bytes = the model dtype (QLoRA: fp32), c a matmul output's bytes = 2 under autocast, else r
(QLoRA too, whatever its compute dtype: bitsandbytes returns the input's dtype)). A term counts only where gradients
flow through its tensor:
    RMSNorm x2     4H + 4: input upcast to fp32 and 1/rms (+ H.r normalised input when the norm weight trains);
                   Gemma 2 and 3 add two (x4: after attention, on o_proj's output, and after the MLP, on down_proj's)
    q/k norms      Qwen3, Gemma 3: 4 n_h.d + 4 n_h for q_norm, 4 n_kv.d + 4 n_kv for k_norm (+ the normalised
                   values in c bytes when their weights train)
    linear inputs  a norm output (H.r) is kept once when a consumer needs it for a weight gradient (a trained
                   weight or an adapter); a consumer that casts (autocast to 16 bit, peft's cast to fp32
                   adapters) keeps its own copy: up to 3 (q, k, v) and 2 (gate, up)
    attention      SDPA keeps q, k, v and its output ((2 n_h + 2 n_kv) d.c; o_proj reads that output) and a
                   log-sum-exp (4 n_h); with an attention mask (padding) k and v are repeated to n_h heads and
                   each layer also keeps the (R, 1, T, T) mask converted to c bytes (R.T^2.c per layer). Packed
                   and padding-free rows (one row of R.T tokens) have no mask: attention runs per example
    MLP            3 I.c (gate, up, silu(gate)) + I.c for down_proj's input when it needs it
    LoRA           r_lora per adapted module (lora_A's output), in fp32 (2 bytes under autocast)
    LoRA dropout   peft runs lora_A(dropout(x)) in each adapted module, so with strategy.lora.dropout > 0 each
                   keeps its own dropped input (in x 4 bytes, the adapter's fp32; its 16-bit cast, 2 bytes, under
                   autocast) in place of the x that adapters reading x would share, and, when x requires grad,
                   the dropout's mask: in x 1 byte on CUDA (native_dropout's bool mask), in x 4 bytes elsewhere
                   (F.dropout is x * noise there and keeps the fp32 noise)
    DoRA           per adapted module (out features o) the base output and the adapter's output, o x (b + a)
                   (a = the adapter's dtype, 2 under autocast, else 4; b = c, or a with dropout, where peft
                   recomputes the base output from the dropped input); and per block, whatever the batch, 4 o
                   x (2 + 1 where the input requires grad) (the weight norm, the scales) and, with dropout where
                   the input requires grad, the base weight cast to the adapter's dtype (in x o x a; not for fp32
                   weights without autocast, whose cast is the weight itself)
    final norm     4H + 4 (+ H.r when it trains) and the LM head's input when the head trains
Layers below every trained weight keep nothing. With adapters the block's input requires grad from the second
block on; in the first, only what lies above its first adapter keeps anything (above q/k/v: all but the first
norm). With gradient checkpointing each block keeps only its input (H.r) and one block is rebuilt at a time in
the backward pass. Other architectures are estimated with the same block (Gemma's GELU MLP keeps what SiLU's
does). tests/test_estimate.py checks these against the tensors autograd saves and the tensors alive in real steps.

Speed: FLOPs per token = 6 x matmul parameters (4 x with frozen weights: no weight gradients; + 2 x under gradient
checkpointing; DoRA with dropout + 4 x its adapted linears, run again on the dropped input) + causal attention
6 x L x n_h.d x T (fwd + bwd), at the device's rate times a utilisation: a GPU's dense 16-bit peak from a table at
40%; on a CPU the rate one of the model's own blocks reaches, trained forward and backward (its matmul shapes, its
other kernels, and the cores as busy as they were then; measured once per machine and block shape, then kept), at
85% (the head, the loss and the optimizer besides). Not modelled: bitsandbytes dequantising every 4-bit weight in
each pass (QLoRA on a CPU).

The modules, lowest first: shape (the model), config_shape (the same from config.json's fields), plan (how it
trains), params, activations, logits, cpu_rate, speed, peak (the phases of a step), from_config (a config's Plan), advice, measure (`--measure`), command.
"""

from tunesmith.train.estimate.activations import (activation_bytes, autocast_copy_bytes, dora_bytes,
                                                  dora_fixed_bytes, layer_activation_bytes, mask_bytes)
from tunesmith.train.estimate.advice import MiB, advice
from tunesmith.train.estimate.command import estimate_command, format_table
from tunesmith.train.estimate.from_config import cached_batch, plan_from_config
from tunesmith.train.estimate.logits import LOSS_CHUNK, fused_loss_bytes, logits_bytes
from tunesmith.train.estimate.measure import measure_peak
from tunesmith.train.estimate.params import layer_trains, model_params, on_grad_path, trainable_params, weight_bytes
from tunesmith.train.estimate.peak import Estimate, estimate_memory
from tunesmith.train.estimate.plan import Plan, matmul_bytes, param_dtype_bytes, residual_bytes
from tunesmith.train.estimate.shape import LINEAR_INPUTS, ModelShape, model_shape
from tunesmith.train.estimate.speed import GPU_PEAK_BF16, device_flops, flops_per_token, matmul_flops

__all__ = ["GPU_PEAK_BF16", "LINEAR_INPUTS", "LOSS_CHUNK", "MiB", "Estimate", "ModelShape", "Plan",
           "activation_bytes", "advice", "autocast_copy_bytes", "cached_batch", "device_flops", "dora_bytes",
           "dora_fixed_bytes", "estimate_command", "estimate_memory", "flops_per_token", "format_table",
           "fused_loss_bytes", "layer_activation_bytes",
           "layer_trains", "logits_bytes", "mask_bytes", "matmul_bytes", "matmul_flops", "measure_peak",
           "model_params", "model_shape", "on_grad_path", "param_dtype_bytes", "plan_from_config",
           "residual_bytes", "trainable_params", "weight_bytes"]
