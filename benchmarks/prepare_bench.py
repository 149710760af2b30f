"""Benchmark `prepare` on synthetic records: exact + near dedup, PII scrubbing, tokenisation.

    .venv/bin/python benchmarks/prepare_bench.py --records 50000 200000 1000000 --num-proc 2

Each size runs in a fresh process (so peak memory is its own) and prints wall time, rows/s and peak RSS
(the process and its tokenisation workers). Records are chat examples of ~200 tokens with planted exact and
near duplicates and personal data, so every step has work to do.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a river city market quiet engine morning report table signal garden copper winter travel "
         "number answer question system value paper light north south stone glass music letter window "
         "careful simple bright narrow gentle rapid silver yellow early later inside outside between").split()


def synthetic_records(n: int, seed: int = 0):
    """~200-token chat records; 5% exact duplicates, 5% near duplicates, 10% with personal data."""
    rng = random.Random(seed)
    previous = []
    for i in range(n):
        roll = rng.random()
        if previous and roll < 0.05:
            record = rng.choice(previous)
        elif previous and roll < 0.10:
            base = rng.choice(previous)
            words = base["messages"][1]["content"].split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            record = {"messages": [base["messages"][0], {"role": "assistant", "content": " ".join(words)}]}
        else:
            question = " ".join(rng.choice(WORDS) for _ in range(30)) + f" item {i}?"
            answer = " ".join(rng.choice(WORDS) for _ in range(120))
            if roll > 0.9:
                answer += f" Contact jane.doe{i}@example.com or call +1 415 555 {1000 + i % 9000:04d}."
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        if len(previous) < 5000:
            previous.append(record)
        yield record


def run_one(n: int, num_proc: int, workdir: Path) -> dict:
    from tunesmith.config import config_from_dict
    from tunesmith.data.build import prepare_from_config
    from tunesmith.demo.tiny import train_tokenizer
    from tunesmith.track.logs import quiet_third_party

    quiet_third_party()
    data = workdir / f"records-{n}.jsonl"
    with data.open("w") as fh:
        for record in synthetic_records(n):
            fh.write(json.dumps(record) + "\n")
    sample = [" ".join(WORDS)] * 50 + ["jane.doe@example.com +1 415 555 1234 item 12345?"] * 10
    tokenizer = train_tokenizer(sample, vocab_size=512)
    tokenizer.chat_template = None
    cfg = config_from_dict({
        "model": {"name_or_path": "unused"},
        "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 512, "num_proc": num_proc,
                 "cache_dir": str(workdir / "cache"),
                 "clean": {"normalize": True, "exact_dedup": True, "near_dedup": "drop", "pii": True}},
    })
    from tunesmith.data.templates import install_template

    install_template(tokenizer, "chatml")
    start = time.perf_counter()
    prepared = prepare_from_config(cfg, tokenizer)
    seconds = time.perf_counter() - start
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    split = prepared.report["splits"]["train"]
    return {"records": n, "seconds": round(seconds, 1), "records_per_s": round(n / seconds),
            "peak_rss_mb": round(peak_kb / 1024), "examples": split["examples"],
            "tokens_per_example": round(split["tokens"] / max(1, split["examples"])),
            "removed": {k: v["removed"] for k, v in prepared.report["clean"]["train"].items()
                        if isinstance(v, dict) and "removed" in v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_one(args.one, args.num_proc, Path(tmp))))
        return
    print("| records | seconds | records/s | peak RSS (MB) | tokens/example | kept |")
    print("|---|---|---|---|---|---|")
    for n in args.records:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--num-proc", str(args.num_proc)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['records']:,} | {r['seconds']} | {r['records_per_s']:,} | {r['peak_rss_mb']} | "
              f"{r['tokens_per_example']} | {r['examples']:,} |", flush=True)


if __name__ == "__main__":
    main()
