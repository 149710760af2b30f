"""Training-step throughput and peak memory as the vocabulary and the sequence length grow, at a fixed number of
tokens per step: tunesmith's fused head + loss next to the loss over the model's logits and transformers' own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling_bench.py --threads 1            # both sweeps, CPU fp32
    .venv/bin/python benchmarks/scaling_bench.py --device cuda --dtype bf16 --tokens 16384   # a GPU machine

Every point is a fresh process (the way benchmarks/dpo_bench.py runs its cases, with its `Meter`): a random
Llama (width 256, 4 layers, 4 heads, MLP 688; only the vocabulary changes) with LoRA r=16 on every linear layer,
fused AdamW, `--steps` steps on random token rows whose every position carries loss (continued pretraining:
the heaviest case for the logits), the first `--warmup` steps left out of the speed. Memory is the peak above
what the process held once the model and optimizer were built (CPU: VmHWM reset through /proc/self/clear_refs,
with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the resident set; CUDA: max_memory_allocated), so the weights, which grow with the vocabulary, are not in it: what is left is what
a step adds, activations and the loss.

    fused   tunesmith's SFT/CLM loss (train.fused_loss: true, the default): the head and the loss on the
            loss-bearing positions, a chunk of rows at a time, gradients made in the forward pass
    logits  tunesmith with train.fused_loss: false: the model's (B, T, V) logits, the loss over them in fp32
            chunks (no fp32 copy of the whole logits)
    naive   transformers' own loss, `model(input_ids, labels=labels).loss`: the (B, T, V) logits upcast to
            fp32 and cross-entropy over all of them, what most training loops call

Sweeps: vocabulary 8k..128k at sequences of --seq-len; sequence length 256..4096 at --vocab (rows per step =
tokens / length).

Distance to the limit: every point also reports its model FLOP/s (benchmarks/flops.py: 4N per token with LoRA's
frozen base plus the adapters, 6N with --strategies full, causal attention 6 n_h.d.T per token and layer, the
head on every position but the first of a row) and their share of the matmul ceiling at the model's GEMM shapes,
measured in the same process right after the steps. The model's width, depth and heads are options (the default
is the one above), so the same sweep runs on another shape, e.g. the SFT benchmark's:

    .venv/bin/python benchmarks/scaling_bench.py --threads 2 --sweeps seq --seq-lens 512 --vocab 16384 \
        --hidden-size 384 --layers 6 --heads 6 --intermediate-size 1024 --paths fused --strategies full lora --repeats 3

--profile adds torch.profiler's table (top operators by self CPU time) of each point's last step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

PATHS = ("fused", "logits", "naive")
STRATEGIES = ("lora", "full")
VOCABS = (8192, 16384, 32768, 65536, 131072)
SEQ_LENS = (256, 512, 1024, 2048, 4096)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


sys.path.insert(0, str(Path(__file__).parent))
import dpo_bench as dpo  # noqa: E402  its Meter: the same speed and memory measure as the other benchmarks
import flops  # noqa: E402  model FLOPs and the matmul ceiling


def run_point(path: str, vocab: int, seq_len: int, args: argparse.Namespace, strategy: str = "lora") -> dict:
    """Train `args.steps` steps of one (path, vocabulary, sequence length, strategy) point in this process."""
    import torch

    from tunesmith.objectives import build_objective
    from tunesmith.train.optim import build_optimizer
    from tunesmith.train.estimate.shape import model_shape

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build(vocab, args, strategy)
    optimizer = build_optimizer(model, 1e-4, 0.0, (0.9, 0.999), 1e-8)
    rows = args.tokens // seq_len
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (rows, seq_len), generator=generator).to(args.device)
               for _ in range(args.steps)]
    objective = build_objective("sft", fused_loss=path == "fused")
    meter = dpo.Meter(args.device)
    meter.start()
    for ids in batches:
        loss = train_step(model, optimizer, objective, ids, path)
        meter.step_end(rows * (seq_len - 1), float(loss))
    result = {"path": path, "vocab": vocab, "seq_len": seq_len, "rows": rows, "strategy": strategy,
              **meter.result(args.warmup)}
    work, shape = [flops.uniform_work(rows, seq_len)] * args.steps, model_shape(llama_config(vocab, args))
    result |= flops.run_limit(result, work, args.warmup, shape, strategy, args.dtype, args.device, lora_r=16,
                              lora_targets=tuple(LORA_TARGETS))
    if args.profile:  # one more step, after the measured ones and the ceiling
        result["profile"] = profile_step(model, optimizer, objective, batches[-1], path)
    return result


def build(vocab: int, args: argparse.Namespace, strategy: str):
    """A random Llama of the options' shape, LoRA r=16 on every linear (or every weight trained), in train mode."""
    from transformers import LlamaForCausalLM

    from tunesmith.model.load import DTYPES
    from tunesmith.model.strategies import apply_strategy

    model = LlamaForCausalLM(llama_config(vocab, args)).to(device=args.device, dtype=DTYPES[args.dtype])
    model = apply_strategy(model, strategy, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                           target_modules=LORA_TARGETS)
    return model.train()


def llama_config(vocab: int, args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=max(SEQ_LENS),
                       tie_word_embeddings=False)


def train_step(model, optimizer, objective, ids, path: str):
    """Forward, backward and an optimizer step on rows `ids` (B, T), every position a target; returns the loss."""
    if path == "naive":
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        out = objective.loss(model, {"input_ids": ids, "labels": ids})
        loss = out.loss_sum / out.num_units
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def profile_step(model, optimizer, objective, ids, path: str) -> str:
    """torch.profiler's table of one training step: the top operators by self CPU time."""
    import time

    from torch.profiler import profile

    with profile() as prof:
        started = time.perf_counter()
        train_step(model, optimizer, objective, ids, path)
        seconds = time.perf_counter() - started
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return f"one step, {seconds:.2f} s under the profiler\n{table}"


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    sweep = []
    if "vocab" in args.sweeps:
        sweep += [("vocab", v, args.seq_len) for v in args.vocabs]
    if "seq" in args.sweeps:
        sweep += [("seq", args.vocab, s) for s in args.seq_lens]
    return sweep


def spawn(path: str, vocab: int, seq_len: int, strategy: str, args: argparse.Namespace) -> dict:
    import os
    import subprocess

    # glibc: a fixed mmap threshold, so freed tensors leave the resident set and VmHWM follows the tensors alive
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    options = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
               if k in FORWARDED and v not in (None, False)]
    out = subprocess.run([sys.executable, __file__, "--one", f"{path},{vocab},{seq_len},{strategy}", *options],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        return {"path": path, "vocab": vocab, "seq_len": seq_len, "strategy": strategy,
                "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


FORWARDED = ("device", "dtype", "threads", "tokens", "steps", "warmup", "seed", "hidden_size", "layers", "heads",
             "kv_heads", "intermediate_size", "profile")  # the options a point's process receives


def table(runs: list[dict], key: str, label: str) -> str:
    """Markdown: one row per sweep value, tokens/s and peak memory of each path (medians over the repeats), and
    naive / fused memory."""
    lines = [f"| {label} | " + " | ".join(f"{p} tokens/s | {p} MB" for p in PATHS) + " | naive / fused memory |",
             "|---" * (2 + 2 * len(PATHS)) + "|"]
    for value in sorted({r[key] for r in runs}):
        by_path = {p: [r for r in runs if r[key] == value and r["path"] == p] for p in PATHS}
        cells = [cell for p in PATHS for cell in _cells(by_path[p])]
        fused, naive = (_median([r for r in by_path[p] if "error" not in r], "peak_mb") for p in ("fused", "naive"))
        ratio = f"{naive / fused:.1f}x" if fused and naive else "-"
        lines.append(f"| {value:,} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def limit_table(runs: list[dict], key: str, label: str) -> str:
    """Markdown: model FLOP/s and their share of the matmul ceiling of each point and path (medians), and the
    share in each repeat."""
    lines = [f"| {label} | path | strategy | {flops.LIMIT_HEADER} share per repeat |", "|---" * 7 + "|"]
    for value in sorted({r[key] for r in runs}):
        for p, strategy in ((p, s) for p in PATHS for s in STRATEGIES):
            rs = [r for r in runs if (r[key], r["path"], r["strategy"]) == (value, p, strategy) and "error" not in r]
            if rs:
                shares = ", ".join(f"{r['share_of_ceiling']:.0%}" for r in rs)
                lines.append(f"| {value:,} | {p} | {strategy} | {flops.limit_cells(rs)} {shares} |")
    return "\n".join(lines)


def _cells(runs: list[dict]) -> list[str]:
    ok = [r for r in runs if "error" not in r]
    if not runs:
        return ["-", "-"]
    if not ok:
        return [runs[0]["error"][:40], "-"]
    return [f"{_median(ok, 'tokens_per_s'):.0f}", f"{_median(ok, 'peak_mb'):.0f}"]


def _median(runs: list[dict], key: str) -> float | None:
    return statistics.median(r[key] for r in runs) if runs else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", nargs="+", choices=("vocab", "seq"), default=["vocab", "seq"])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--vocabs", nargs="+", type=int, default=list(VOCABS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=list(SEQ_LENS))
    p.add_argument("--vocab", type=int, default=32768, help="the vocabulary of the sequence-length sweep")
    p.add_argument("--seq-len", type=int, default=1024, help="the sequence length of the vocabulary sweep")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (rows x sequence length)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["lora"],
                   help="LoRA r=16 on every linear and/or every weight trained (interleaved within a repeat)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: as many as --heads)")
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--repeats", type=int, default=1, help="every point this many times (tables: medians)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of one more step")
    p.add_argument("--bf16-ceiling", action="store_true",
                   help="also measure the bf16 matmul ceiling once (slow on a CPU that emulates bf16)")
    p.add_argument("--json", help="also write every point's measurements to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "path,vocab,seq_len,strategy" in this process
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.one:
        path, vocab, seq_len, strategy = args.one.split(",")
        print(json.dumps(run_point(path, int(vocab), int(seq_len), args, strategy)))
        return
    runs = run_sweeps(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    if runs["vocab"]:
        print(f"Vocabulary sweep: {args.tokens:,} tokens per step in rows of {args.seq_len:,}\n")
        for strategy in args.strategies:
            print(f"{strategy}:\n\n" + table([r for r in runs["vocab"] if r["strategy"] == strategy], "vocab",
                                              "vocabulary") + "\n")
        print(limit_table(runs["vocab"], "vocab", "vocabulary") + "\n")
        fused = [r["peak_mb"] for r in runs["vocab"] if r["path"] == "fused" and "error" not in r]
        if len(fused) > 1:
            print(f"fused peak memory, largest / smallest vocabulary: {max(fused) / min(fused):.2f}x "
                  f"({statistics.mean(fused):.0f} MB mean)\n")
    if runs["seq"]:
        print(f"Sequence-length sweep: {args.tokens:,} tokens per step, vocabulary {args.vocab:,}\n")
        for strategy in args.strategies:
            print(f"{strategy}:\n\n" + table([r for r in runs["seq"] if r["strategy"] == strategy], "seq_len",
                                              "sequence length") + "\n")
        print(limit_table(runs["seq"], "seq_len", "sequence length"))
    if args.bf16_ceiling:
        print("\n" + bf16_line(args))


def run_sweeps(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every point, path and strategy `args.repeats` times, each in a fresh process, the strategies' order
    alternating between repeats; one line per run (and its profile)."""
    runs = {"vocab": [], "seq": []}
    for repeat in range(args.repeats):
        for sweep, vocab, seq_len in points(args):
            for path in args.paths:
                for strategy in args.strategies if repeat % 2 == 0 else args.strategies[::-1]:
                    r = {**spawn(path, vocab, seq_len, strategy, args), "repeat": repeat}
                    runs[sweep].append(r)
                    _show(r, repeat, sweep)
    return runs


def _show(r: dict, repeat: int, sweep: str) -> None:
    shown = r.get("error") or (f"{r['tokens_per_s']:.0f} tokens/s, {r['peak_mb']:.0f} MB above start, "
                               f"{r['share_of_ceiling']:.0%} of the matmul ceiling")
    print(f"repeat {repeat} {sweep} {r['path']} {r['strategy']} vocab {r['vocab']} seq {r['seq_len']}: {shown}",
          file=sys.stderr, flush=True)
    if r.get("profile"):
        print(r["profile"], file=sys.stderr, flush=True)


def bf16_line(args: argparse.Namespace) -> str:
    """flops.ceilings_line for the model at the first point's shapes (4,096 tokens per step: rows x length)."""
    import torch

    from tunesmith.train.estimate.shape import model_shape

    if args.threads:
        torch.set_num_threads(args.threads)
    vocab, seq_len = points(args)[0][1:]
    rows = args.tokens // seq_len
    return flops.ceilings_line(model_shape(llama_config(vocab, args)), rows * seq_len, rows * (seq_len - 1),
                               args.device)


if __name__ == "__main__":
    main()
