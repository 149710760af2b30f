"""Distance to the limit: the model FLOPs a training step needs, per second, as a share of the matrix-multiply rate
this machine reaches on the model's own GEMM shapes, measured in the same run.

Model FLOPs count the work a step needs, whatever an implementation adds (padding, logits of positions without
loss, recomputation), so every side of a comparison is credited the same FLOPs for the same batches. They come
from `tunesmith.train.estimate.speed.flops_per_token` (the one place the formula lives), split into its parts
and applied to what the step holds (N: the weights of the blocks' linears; n_h.d: query width; H, V: hidden,
vocabulary; l: a sequence's length):

    blocks     per real token: 2N forward + 2N input gradients + 2N weight gradients where weights train,
               so 6N for full fine-tuning and 4N with a frozen base (LoRA)
    attention  causal, within each sequence: 2 n_h.d.l per position forward (QK^T and AV over l/2 keys on
               average), twice that backward: 6 n_h.d.l^2 per sequence and layer
    head       per loss position (the logits a loss needs): 2VH forward + 2VH input gradient (+ 2VH weight
               gradient when it trains: full fine-tuning)
    adapters   LoRA: 6 x the adapter weights per token (forward, input and weight gradients of r (in + out) per
               adapted linear), the small term flops_per_token leaves out
    reference  a step that also runs a reference forward (DPO with a live reference): 2N + 2 n_h.d.l per
               position + 2VH per loss position, no gradients

The ceiling is the rate `torch.mm` reaches on the step's linear GEMMs, each timed alone (the best of a few calls,
after the run, in the same process and thread count), weighted by how many FLOPs the step spends in it: for each
linear of a block (in -> out) over the step's M positions, forward x W^T (M, in) x (in, out), input gradient
(M, out) x (out, in) and, where the weights train, weight gradient (out, M) x (M, in); the LM head likewise over
the loss positions. Attention's batched matmuls and the adapters' rank-r matmuls are in the model FLOPs but not
in the ceiling. On a CPU without bf16 instructions (tunesmith.hardware: no avx512_bf16 or AMX) bf16 matmuls are
emulated and 20-200x slower than fp32: there the bf16 ceiling is timed on BF16_EMULATED_ROWS rows, one call each.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tunesmith.hardware import cpu_info
from tunesmith.train.estimate.params import trainable_params
from tunesmith.train.estimate.plan import Plan
from tunesmith.train.estimate.shape import ModelShape, model_shape
from tunesmith.train.estimate.speed import flops_per_token

IGNORE_INDEX = -100
BF16_EMULATED_ROWS = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shape_of(model_dir: str | Path) -> ModelShape:
    """The shape of a saved model (from its config; no weights read)."""
    from transformers import AutoConfig

    return model_shape(AutoConfig.from_pretrained(model_dir))


# ---------------------------------------------------------------------------------------------------
# Model FLOPs of a step


def batch_work(batches: list[dict[str, torch.Tensor]]) -> dict[str, int]:
    """What the FLOPs of a step depend on, from tunesmith's collated micro-batches: real tokens, the sum of the
    squared sequence lengths (a padding-free or packed row holds several sequences: position ids restart at 0; a
    pair's answer that shares its prompt, of n tokens after q shared ones, attends to q + its own: n^2 + 2nq), loss
    positions (a label after the first column), and positions (B x T, what the GEMMs run on)."""
    work = {"tokens": 0, "sum_sq": 0, "loss_positions": 0, "positions": 0}
    for batch in batches:
        runs = sequence_runs(batch)
        work["tokens"] += sum(n for n, _ in runs)
        work["sum_sq"] += sum(n * n + 2 * n * shared for n, shared in runs)
        work["loss_positions"] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        work["positions"] += batch["input_ids"].numel()
    return work


def sequence_runs(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(length, shared prompt tokens it attends to) of each sequence of a right-padded batch: a row each, or the
    runs of a row's position ids (tunesmith.model.attention.runs)."""
    from tunesmith.model.attention import runs

    real = batch["token_mask"].sum(1).tolist()  # (B,) real tokens lead each row
    if "position_ids" not in batch:
        return [(n, 0) for n in real]
    out = []
    for row, n in zip(runs(batch["position_ids"]), real):
        out += [(min(e, n) - s, shared) for s, e, _, shared in row if s < n]
    return out


def uniform_work(rows: int, seq_len: int) -> dict[str, int]:
    """The work of `rows` rows of `seq_len` tokens, every position but the first carrying loss."""
    return {"tokens": rows * seq_len, "sum_sq": rows * seq_len**2, "loss_positions": rows * (seq_len - 1),
            "positions": rows * seq_len}


def step_flops(shape: ModelShape, strategy: str, work: dict[str, int], lora_r: int = 16,
               lora_targets: tuple[str, ...] = (), reference: bool = False) -> float:
    """Model FLOPs of one step (module docstring): strategy "full" or "lora"."""
    blocks, attention, head = _parts(shape, Plan(**_PLAN, strategy=strategy))
    total = blocks * work["tokens"] + attention * work["sum_sq"] + head * work["loss_positions"]
    if strategy == "lora":
        lora = Plan(**_PLAN, strategy="lora", lora_r=lora_r, lora_targets=tuple(lora_targets))
        total += 6 * trainable_params(shape, lora) * work["tokens"]
    if reference:  # strategy "head" with a frozen head: nothing on the gradient path, so a forward only
        blocks, attention, head = _parts(shape, Plan(**_PLAN, strategy="head"))
        total += blocks * work["tokens"] + attention * work["sum_sq"] + head * work["loss_positions"]
    return total


_PLAN = {"rows": 1, "seq_len": 0, "loss_rows": 0, "mask": False, "weight_bytes": 4, "amp": False}


def _parts(shape: ModelShape, plan: Plan) -> tuple[float, float, float]:
    """flops_per_token split: (blocks per token, attention per token and unit of sequence length, head per
    loss position)."""
    blocks = flops_per_token(shape, replace(plan, vocab_logits=False))
    attention = flops_per_token(shape, replace(plan, seq_len=1, vocab_logits=False)) - blocks
    head = flops_per_token(shape, plan) - blocks
    return blocks, attention, head


# ---------------------------------------------------------------------------------------------------
# The matmul ceiling at the step's GEMM shapes


@dataclass(frozen=True)
class Gemm:
    """One matmul of a step, (rows x inner) @ (inner x out) in the layout a linear layer's pass uses it."""

    kind: str  # "forward" (x W^T), "input grad" (dY W), "weight grad" (dY^T x)
    rows: int  # M: positions (or, for a weight gradient, the linear's out features)
    inp: int  # the linear's in features
    out: int  # the linear's out features
    count: int  # how many times a step runs it

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.inp * self.out

    def operands(self, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        def rand(*size):
            return torch.randn(*size, device=device).to(dtype)

        if self.kind == "forward":
            return rand(self.rows, self.inp), rand(self.out, self.inp).t()
        if self.kind == "input grad":
            return rand(self.rows, self.out), rand(self.out, self.inp)
        return rand(self.rows, self.out).t(), rand(self.rows, self.inp)  # (out, M) @ (M, in)


def step_gemms(shape: ModelShape, strategy: str, positions: int, loss_positions: int) -> list[Gemm]:
    """The linear GEMMs of a training step over `positions` rows (the head over `loss_positions`)."""
    kinds = ("forward", "input grad", "weight grad") if strategy == "full" else ("forward", "input grad")
    counts: dict[tuple[int, int], int] = {}
    for inp, out in shape.block_linears.values():
        counts[(inp, out)] = counts.get((inp, out), 0) + shape.layers
    gemms = [Gemm(kind, positions, inp, out, count) for (inp, out), count in counts.items() for kind in kinds]
    return gemms + [Gemm(kind, loss_positions, shape.hidden, shape.vocab, 1) for kind in kinds]


def matmul_ceiling(gemms: list[Gemm], dtype: str = "fp32", device: str = "cpu", calls: int = 3) -> dict:
    """The FLOP-weighted rate of `gemms`, each the best of `calls` calls (the first included): FLOP/s of wall
    time and of the process's CPU time. Emulated bf16 (module docstring) runs on BF16_EMULATED_ROWS rows, once."""
    emulated = dtype == "bf16" and device == "cpu" and not cpu_info()["bf16"]
    flops = wall = cpu = 0.0
    for g in gemms:
        if emulated:
            g, calls = Gemm(g.kind, min(g.rows, BF16_EMULATED_ROWS), g.inp, g.out, g.count), 1
        best_wall, best_cpu = _time_gemm(g, DTYPES[dtype], device, calls)
        flops, wall, cpu = flops + g.count * g.flops, wall + g.count * best_wall, cpu + g.count * best_cpu
    return {"dtype": dtype, "flops_per_s": flops / wall, "flops_per_cpu_s": flops / cpu, "emulated": emulated}


def _time_gemm(g: Gemm, dtype: torch.dtype, device: str, calls: int) -> tuple[float, float]:
    a, b = g.operands(dtype, device)
    walls, cpus = [], []
    for _ in range(calls):
        wall, cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), max(min(cpus), 1e-9)


# ---------------------------------------------------------------------------------------------------
# What the benchmarks report


def run_limit(run: dict, work: list[dict[str, int]], warmup: int, shape: ModelShape, strategy: str,
              dtype: str = "fp32", device: str = "cpu", **flop_options) -> dict:
    """A run's model FLOP/s (of wall and of CPU time) and their share of the ceiling, measured now at its steps'
    mean shapes. `run`: a Meter result (tokens_per_s, tokens_per_cpu_s, step_tokens); `work`: batch_work of each
    of its steps; flop_options: step_flops' lora_r, lora_targets, reference."""
    measured, tokens = work[warmup:], sum(run["step_tokens"][warmup:])
    flops = sum(step_flops(shape, strategy, w, **flop_options) for w in measured)
    mean = {k: round(statistics.mean(w[k] for w in measured)) for k in ("positions", "loss_positions")}
    ceiling = matmul_ceiling(step_gemms(shape, strategy, mean["positions"], mean["loss_positions"]), dtype, device)
    model, model_cpu = run["tokens_per_s"] * flops / tokens, run["tokens_per_cpu_s"] * flops / tokens
    return {"model_flops_per_s": model, "ceiling_flops_per_s": ceiling["flops_per_s"],
            "share_of_ceiling": model / ceiling["flops_per_s"],
            "cpu_share_of_ceiling": model_cpu / ceiling["flops_per_cpu_s"], "flops_per_step": flops / len(measured)}


def ceilings_line(shape: ModelShape, positions: int, loss_positions: int, device: str = "cpu") -> str:
    """One line: the fp32 and bf16 ceilings of a full fine-tuning step's GEMMs, and whether bf16 is emulated."""
    gemms = step_gemms(shape, "full", positions, loss_positions)
    fp32, bf16 = (matmul_ceiling(gemms, dtype, device) for dtype in ("fp32", "bf16"))
    flags = cpu_info()
    how = (f"emulated (no avx512_bf16 or AMX on {flags['model']}): timed on {BF16_EMULATED_ROWS} rows"
           if bf16["emulated"] else "in hardware")
    threads = torch.get_num_threads()
    return (f"matmul ceiling at the model's GEMM shapes ({positions} positions, {threads} thread(s)): fp32"
            f" {fp32['flops_per_s'] / 1e9:.1f} GFLOP/s, bf16 {bf16['flops_per_s'] / 1e9:.2f} GFLOP/s, {how}")


def limit_cells(runs: list[dict]) -> str:
    """Markdown cells of a table row: median model GFLOP/s, ceiling GFLOP/s and share (wall; CPU time)."""
    runs = [r for r in runs if "share_of_ceiling" in r]
    if not runs:
        return "- | - | - |"
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return (f"{med('model_flops_per_s') / 1e9:.1f} | {med('ceiling_flops_per_s') / 1e9:.1f} | "
            f"{med('share_of_ceiling'):.0%} ({med('cpu_share_of_ceiling'):.0%}) |")


LIMIT_HEADER = "model GFLOP/s | matmul ceiling GFLOP/s | share of ceiling (of CPU time) |"
