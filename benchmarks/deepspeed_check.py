"""DeepSpeed ZeRO-2 and ZeRO-3 executed: `tunesmith train` on a small random Llama for a few steps with
train.distributed.strategy=deepspeed (configs/deepspeed/zero2.json, zero3.json), one process under torchrun, next
to the same run without DeepSpeed; prints each run's losses and whether they agree. Needs a CUDA GPU and the
deepspeed package (benchmarks/gpu_check.sh runs it).

    .venv/bin/python benchmarks/deepspeed_check.py OUT_DIR
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_inputs(out: Path) -> None:
    """A random Llama (width 256, 4 layers) with a BPE tokenizer trained on the data, and 256 chat rows."""
    from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer

    rng = random.Random(0)
    rows = []
    for _ in range(256):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"It is {a + b}."}]})
    (out / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=512)
    save_tiny(out / "model", build_model("llama", len(tokenizer), 256, 4, 4), tokenizer)


def config(out: Path, name: str, zero: int | None) -> Path:
    cfg = {
        "model": {"name_or_path": str(out / "model"), "dtype": "bf16"},
        "data": {"train": [str(out / "chats.jsonl")], "template": "chatml", "max_seq_len": 128},
        "strategy": {"name": "full"},
        "train": {"output_dir": str(out / name), "objective": "sft", "max_steps": 6, "micro_batch_size": 8,
                  "lr": 1e-4, "seed": 0, "save_every": None, "mixed_precision": "bf16",
                  **({"distributed": {"strategy": "deepspeed",
                                      "deepspeed_config": str(ROOT / f"configs/deepspeed/zero{zero}.json")}}
                     if zero else {})},
        "tracking": {"progress_bar": False},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    write_inputs(out)
    results = {}
    for name, zero in (("plain", None), ("zero2", 2), ("zero3", 3)):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m",
                               "tunesmith", "train", str(config(out, name, zero))], capture_output=True, text=True)
        (out / f"{name}.log").write_text(done.stdout + done.stderr)
        results[name] = losses(out / name) if done.returncode == 0 else None
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")] or ["see the log"]
        print(f"{name}: exit {done.returncode}, losses {results[name]}" if results[name] is not None
              else f"{name}: exit {done.returncode}: {errors[0]} ({out / name}.log)")
    for name in ("zero2", "zero3"):
        if results["plain"] and results[name]:
            diff = max(abs(a - b) for a, b in zip(results["plain"], results[name]))
            print(f"{name} against plain: largest loss difference {diff:.2e} over {len(results[name])} steps")


if __name__ == "__main__":
    main()
