"""Speed: training FLOPs per token, and the FLOP/s the device can give them."""

from __future__ import annotations

import time

import torch

from tunesmith.train.estimate.params import layer_trains, on_grad_path
from tunesmith.train.estimate.plan import Plan
from tunesmith.train.estimate.shape import ModelShape

# Dense 16-bit tensor-core peaks (FLOP/s), by a name fragment of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12,
                 "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12,
                 "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}
GPU_UTILISATION = 0.4  # model FLOPs utilisation assumed for a well-fed GPU
CPU_UTILISATION = 0.5  # share of the measured matmul rate a whole training step reaches on CPU


def flops_per_token(shape: ModelShape, plan: Plan) -> float:
    """Training FLOPs per position: forward 2 x matmul params; backward 2 x for input gradients where gradients
    flow and 2 x for weight gradients where weights train; causal attention 2 n_h.d.T forward, twice that
    backward; one more forward of each block under gradient checkpointing."""
    s, q = shape, shape.heads * shape.head_dim
    per_layer, attention = 2 * s.block_matmul_params, 2 * q * plan.seq_len
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
