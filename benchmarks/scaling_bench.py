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
            loss-bearing positions, 2^22 logits at a time, gradients made in the forward pass
    logits  tunesmith with train.fused_loss: false: the model's (B, T, V) logits, the loss over them in fp32
            chunks (no fp32 copy of the whole logits)
    naive   transformers' own loss, `model(input_ids, labels=labels).loss`: the (B, T, V) logits upcast to
            fp32 and cross-entropy over all of them, what most training loops call

Sweeps: vocabulary 8k..128k at sequences of --seq-len; sequence length 256..4096 at --vocab (rows per step =
tokens / length).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

PATHS = ("fused", "logits", "naive")
VOCABS = (8192, 16384, 32768, 65536, 131072)
SEQ_LENS = (256, 512, 1024, 2048, 4096)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


sys.path.insert(0, str(Path(__file__).parent))
import dpo_bench as dpo  # noqa: E402  its Meter: the same speed and memory measure as the other benchmarks


def run_point(path: str, vocab: int, seq_len: int, args: argparse.Namespace) -> dict:
    """Train `args.steps` steps of one (path, vocabulary, sequence length) point in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.model.load import DTYPES
    from tunesmith.model.strategies import apply_strategy
    from tunesmith.objectives import build_objective
    from tunesmith.train.optim import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(SEQ_LENS),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=DTYPES[args.dtype])
    model = apply_strategy(model, "lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model.train()
    optimizer = build_optimizer(model, 1e-4, 0.0, (0.9, 0.999), 1e-8)
    rows = args.tokens // seq_len
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (rows, seq_len), generator=generator).to(args.device)
               for _ in range(args.steps)]
    objective = build_objective("sft", fused_loss=path == "fused")
    meter = dpo.Meter(args.device)
    meter.start()
    for ids in batches:
        if path == "naive":
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            out = objective.loss(model, {"input_ids": ids, "labels": ids})
            loss = out.loss_sum / out.num_units
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_end(rows * (seq_len - 1), float(loss))
    return {"path": path, "vocab": vocab, "seq_len": seq_len, "rows": rows, **meter.result(args.warmup)}


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    sweep = []
    if "vocab" in args.sweeps:
        sweep += [("vocab", v, args.seq_len) for v in args.vocabs]
    if "seq" in args.sweeps:
        sweep += [("seq", args.vocab, s) for s in args.seq_lens]
    return sweep


def spawn(path: str, vocab: int, seq_len: int, args: argparse.Namespace) -> dict:
    import os
    import subprocess

    # glibc: a fixed mmap threshold, so freed tensors leave the resident set and VmHWM follows the tensors alive
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
               if k in ("device", "dtype", "threads", "tokens", "steps", "warmup", "seed") and v is not None]
    out = subprocess.run([sys.executable, __file__, "--one", f"{path},{vocab},{seq_len}", *options],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        return {"path": path, "vocab": vocab, "seq_len": seq_len, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(runs: list[dict], key: str, label: str) -> str:
    """Markdown: one row per sweep value, tokens/s and peak memory of each path, and fused / naive."""
    values = sorted({r[key] for r in runs})
    lines = [f"| {label} | " + " | ".join(f"{p} tokens/s | {p} MB" for p in PATHS) + " | naive / fused memory |",
             "|---" * (2 + 2 * len(PATHS)) + "|"]
    for value in values:
        cells, by_path = [], {r["path"]: r for r in runs if r[key] == value}
        for p in PATHS:
            r = by_path.get(p)
            cells += ["-", "-"] if r is None else \
                [r.get("error", "failed")[:40], "-"] if "error" in r else \
                [f"{r['tokens_per_s']:.0f}", f"{r['peak_mb']:.0f}"]
        f, n = by_path.get("fused"), by_path.get("naive")
        ratio = f"{n['peak_mb'] / f['peak_mb']:.1f}x" if f and n and "error" not in f and "error" not in n else "-"
        lines.append(f"| {value:,} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


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
    p.add_argument("--json", help="also write every point's measurements to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "path,vocab,seq_len" in this process
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.one:
        path, vocab, seq_len = args.one.split(",")
        print(json.dumps(run_point(path, int(vocab), int(seq_len), args)))
        return
    runs = {"vocab": [], "seq": []}
    for sweep, vocab, seq_len in points(args):
        for path in args.paths:
            r = spawn(path, vocab, seq_len, args)
            runs[sweep].append(r)
            shown = r.get("error") or f"{r['tokens_per_s']:.0f} tokens/s, {r['peak_mb']:.0f} MB above start"
            print(f"{sweep} {path} vocab {vocab} seq {seq_len}: {shown}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    if runs["vocab"]:
        print(f"Vocabulary sweep: {args.tokens:,} tokens per step in rows of {args.seq_len:,}\n")
        print(table(runs["vocab"], "vocab", "vocabulary") + "\n")
        fused = [r["peak_mb"] for r in runs["vocab"] if r["path"] == "fused" and "error" not in r]
        if len(fused) > 1:
            print(f"fused peak memory, largest / smallest vocabulary: {max(fused) / min(fused):.2f}x "
                  f"({statistics.mean(fused):.0f} MB mean)\n")
    if runs["seq"]:
        print(f"Sequence-length sweep: {args.tokens:,} tokens per step, vocabulary {args.vocab:,}\n")
        print(table(runs["seq"], "seq_len", "sequence length"))


if __name__ == "__main__":
    main()
