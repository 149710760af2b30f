"""Speed: training FLOPs per token, and the FLOP/s the device can give them."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

from tunesmith.train.estimate.cpu_rate import cached_rate, expected_threads
from tunesmith.train.estimate.params import layer_trains, on_grad_path
from tunesmith.train.estimate.plan import Plan
from tunesmith.train.estimate.shape import ModelShape

# Dense 16-bit tensor-core peaks (FLOP/s), by a name fragment of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12,
                 "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12,
                 "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}
GPU_UTILISATION = 0.4  # model FLOPs utilisation assumed for a well-fed GPU
CPU_UTILISATION = 0.85  # share of one block's measured rate that a whole step reaches on a CPU (docs/PERFORMANCE.md)
BLOCK_PASS_FLOPS = 5e9  # FLOPs of one timed pass of a block on a CPU: about a second


def flops_per_token(shape: ModelShape, plan: Plan) -> float:
    """Training FLOPs per position: forward 2 x matmul params; backward 2 x for input gradients where gradients
    flow and 2 x for weight gradients where weights train; causal attention 2 n_h.d.T forward, twice that
    backward; one more forward of each block under gradient checkpointing. DoRA with dropout runs each adapted
    linear a second time on the dropped input (peft's base output), forward and backward: 4 x its parameters.
    The head's share is averaged over the positions: it runs on `head_share` of them."""
    s, q = shape, shape.heads * shape.head_dim
    per_layer, attention = 2 * s.block_matmul_params, 2 * q * plan.seq_len
    if plan.strategy == "dora" and plan.lora_dropout:
        per_layer += sum(2 * i * o for name, (i, o) in s.block_linears.items() if name in plan.lora_targets)
    total = 0.0
    for layer in range(s.layers):
        path, trains = on_grad_path(plan, layer, s.layers), layer_trains(plan, layer, s.layers)
        total += per_layer * (1 + path + trains) + attention * (1 + 2 * path)
        if plan.gradient_checkpointing and path:
            total += per_layer + attention
    head = 2 * s.vocab * s.hidden * head_share(plan) if plan.vocab_logits else 0
    any_path = any(on_grad_path(plan, i, s.layers) for i in range(s.layers))
    return total + head * (1 + any_path + (plan.strategy == "full" or plan.head_trains))


def head_share(plan: Plan) -> float:
    """The share of positions the LM head runs on: the loss positions under the fused loss, the positions from the
    first answer token on where the logits start there (`logit_positions`), else every one."""
    positions = plan.rows * plan.seq_len
    if plan.fused_loss and positions:
        return min(1.0, plan.loss_rows / positions)
    if plan.logit_positions and plan.seq_len:
        return min(1.0, plan.logit_positions / plan.seq_len)
    return 1.0


def device_flops(plan: Plan, shape: ModelShape, config_of: Callable[[], object],
                 trust_remote_code: bool = False) -> tuple[str, float, float]:
    """(device name, FLOP/s, assumed utilisation) on `plan.device`: a GPU's 16-bit peak from the table, else a
    matmul measured now (fp32 on GPUs, GPUs not in the table); on a CPU the rate of one of the model's own blocks
    (`block_seconds` on `config_of()`, the model's `transformers` config), measured once per machine and block shape
    and kept (cpu_rate.py), so that a later estimate imports neither torch nor transformers."""
    sixteen = plan.amp or plan.weight_bytes == 2
    if plan.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        if peak is not None and sixteen:
            return name, peak, GPU_UTILISATION
        dtype = torch.bfloat16 if sixteen else torch.float32
        return f"{name} (matmul measured)", matmul_flops(dtype, "cuda"), GPU_UTILISATION
    rows, length = block_pass(shape, plan.seq_len, plan.rows * plan.seq_len)
    block = {"model_type": shape.model_type, "block_linears": shape.block_linears, "heads": shape.heads,
             "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "rows": rows, "length": length,
             "weight_bytes": plan.weight_bytes, "amp": plan.amp}
    flops = block_position_flops(shape, length) * rows * length
    rate, when = cached_rate(block, lambda: flops / block_seconds(config_of(), rows, length, plan.weight_bytes,
                                                                  plan.amp, trust_remote_code))
    return f"CPU, {expected_threads()} threads (one block measured {when})", rate, CPU_UTILISATION


def block_pass(shape: ModelShape, seq_len: int, tokens: int) -> tuple[int, int]:
    """(rows, length) of the timed pass of one block: up to `tokens` positions in rows of up to `seq_len`, cut to
    about BLOCK_PASS_FLOPS."""
    positions = max(1, min(tokens, int(BLOCK_PASS_FLOPS / block_position_flops(shape, seq_len))))
    length = min(seq_len, positions)
    return max(1, positions // length), length


def block_position_flops(shape: ModelShape, length: int) -> float:
    """FLOPs of one position of one block trained forward and backward, in rows of `length`, counted as
    `flops_per_token` does: 6 x the block's matmul weights + causal attention 6 n_h.d.T."""
    return 6 * shape.block_matmul_params + 6 * shape.heads * shape.head_dim * length


def block_seconds(config, rows: int, length: int, weight_bytes: int = 4, amp: bool = False,
                  trust_remote_code: bool = False) -> float:
    """Seconds of one forward and backward pass of one of the model's own blocks (random weights; bf16 where
    `weight_bytes` is 2, else fp32) with its weights training, on a (rows, length) batch, on the CPU as it is
    now: the median of three timed passes after a warm-up. Unlike a large matmul this sees the block's own matmul
    shapes, its other kernels, and what the threads lose waiting for each other when other work shares the cores
    (libgomp's spinning: several times slower with 2 threads than 1 on a shared 2-core CPU, docs/PERFORMANCE.md)."""
    import torch
    from transformers import AutoModelForCausalLM

    one = copy.deepcopy(config)
    for key, value in vars(one).items():  # per-layer settings (e.g. layer_types) keep their first layer's
        if isinstance(value, list) and len(value) == config.num_hidden_layers:
            setattr(one, key, value[:1])
    one.num_hidden_layers, one.vocab_size = 1, 64  # a tiny head: the block's time
    one.pad_token_id = one.bos_token_id = one.eos_token_id = None  # ids the tiny vocabulary may not hold
    model = AutoModelForCausalLM.from_config(one, trust_remote_code=trust_remote_code)
    model = model.to(torch.bfloat16 if weight_bytes == 2 else torch.float32).train()
    ids = torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids).logits
        logits.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def matmul_flops(dtype, device: str, n: int = 1024, seconds: float = 0.3) -> float:
    """The best rate of an n x n x n matmul of torch `dtype` over ~`seconds` (after one warm-up)."""
    import torch

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
