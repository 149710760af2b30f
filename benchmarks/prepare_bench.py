"""Benchmark `prepare` on synthetic records: exact + near dedup, PII scrubbing, tokenisation.

    .venv/bin/python benchmarks/prepare_bench.py --records 50000 200000 1000000 --num-proc 2

Each size runs in a fresh process (so peak memory is its own) and prints wall time; CPU time of the process
and its workers (what the run costs, whatever else the machine runs); rows/s; peak RSS (the larger of the
process's and its largest worker's, from getrusage); the peak memory of the process and its workers together
(their summed PSS, sampled every 250 ms); and the 5-minute load average at the end (the machine may be shared).
Records are chat examples of ~200 tokens with planted exact and near duplicates and personal data, so every
step has work to do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
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


def tree_pss_mb(pid: int) -> float:
    """Memory of a process and all its descendants: the sum of their proportional set sizes (each page shared
    by k processes counts 1/k in each, so forked workers' shared pages are not counted twice). Linux /proc."""
    total, stack = 0, [pid]
    while stack:
        proc = Path(f"/proc/{stack.pop()}")
        try:
            rollup = (proc / "smaps_rollup").read_text()
            total += int(rollup.split("\nPss:")[1].split()[0])  # kB
            for task in (proc / "task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker that just ended
    return total / 1024


class PeakSampler(threading.Thread):
    """The largest `tree_pss_mb` of this process seen while it runs."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, tree_pss_mb(os.getpid()))


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its workers that have ended."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


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
    sampler = PeakSampler()
    sampler.start()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    prepared = prepare_from_config(cfg, tokenizer)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    sampler.done.set()
    load = os.getloadavg()[1]  # the 5-minute average, ending now
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    split = prepared.report["splits"]["train"]
    return {"records": n, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "records_per_s": round(n / seconds), "peak_rss_mb": round(peak_kb / 1024),
            "peak_tree_mb": round(sampler.peak), "load": round(load, 1), "examples": split["examples"],
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
    print("| records | seconds | CPU seconds | records/s | peak RSS (MB) | all processes (MB) | tokens/example | kept "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.records:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--num-proc", str(args.num_proc)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['records']:,} | {r['seconds']} | {r['cpu_seconds']} | {r['records_per_s']:,} | "
              f"{r['peak_rss_mb']:,} | {r['peak_tree_mb']:,} | {r['tokens_per_example']} | {r['examples']:,} | "
              f"{r['load']} |", flush=True)


if __name__ == "__main__":
    main()
