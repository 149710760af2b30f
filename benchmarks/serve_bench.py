"""Continuous batching in the serve engine: aggregate generated tokens/s with 1, 8 and 32 requests in flight on
SmolLM2-135M-Instruct, against one request at a time.

    .venv/bin/python benchmarks/serve_bench.py --threads 2 --repeats 3
    .venv/bin/python benchmarks/serve_bench.py --threads 1 --repeats 3

With more threads than idle cores (a shared machine), set OMP_WAIT_POLICY=PASSIVE: by default the idle OpenMP
thread spins after every parallel region and takes the core the working one needs (docs/PERFORMANCE.md,
Generation: 9x slower steps at 2 threads on 2 busy cores).

The model is the packaged `smollm2-135m-instruct` (converted and cached on first use; fp32 on the CPU). Requests
are chat prompts through its template (a question each, 30-40 tokens with the template's system turn), answered
greedily up to --max-new-tokens; an answer ends at <|im_end|> or at the limit, so requests leave the batch at
different steps and the next one takes the place. A client keeps C requests in flight on one `Engine` (submit,
events by callback; no HTTP), submitting the next the moment one ends: C = 1 is one request at a time. Level C
answers the first `--requests-per-level` requests (default: 8 at C = 1, else 2 C, at least 16), after a warm-up
request; tokens/s is every generated token (the end-of-turn token included) over the wall time from the first
submission to the last event (tokens/CPU-s: over the CPU time the process used meanwhile, less sensitive to
other work on a shared machine). A repeat runs every level in an order that alternates between repeats; the ratio
to C = 1 is taken within a repeat, and the median over repeats is reported. Greedy answers are compared with
the same request's answer at C = 1 (fp32 rounding differs between batch shapes, so a near tie may flip).

    .venv/bin/python benchmarks/serve_bench.py --threads 1 --eval-check 32

compares `tunesmith eval`'s generation (the same decoding, 8 rows at a time) with what it ran before,
transformers `generate` on left-padded batches of 8, answer by answer, and

    .venv/bin/python benchmarks/serve_bench.py --threads 1 --profile 32

prints torch.profiler's table of 10 decode steps of 32 rows (where a step's time goes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from functools import partial

import torch

QUESTIONS = [
    "What is the capital of France?", "How do plants make their food?", "Why is the sky blue?",
    "Give me three tips for sleeping better.", "What is a prime number?", "Explain what a CPU does.",
    "How far is the Moon from the Earth?", "What causes rain?", "Name three famous painters.",
    "How do I boil an egg?", "What is photosynthesis?", "Why do cats purr?", "What is the speed of light?",
    "How does a bicycle stay upright?", "Write a haiku about autumn.", "What is machine learning?",
    "How many continents are there?", "What is the largest ocean?", "Why do leaves change colour?",
    "How do vaccines work?", "What is an API?", "Suggest a name for a pet goldfish.", "What is gravity?",
    "How do I make a cup of tea?", "What is the tallest mountain?", "Explain recursion simply.",
    "What do bees eat?", "Why is exercise healthy?", "What is a black hole?", "How do magnets work?",
    "What is democracy?", "Give me a fun fact about octopuses.",
]


def load(threads: int):
    """SmolLM2-135M-Instruct (fp32, eval mode), its tokenizer, stop ids and pad id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.model.sources import resolve_model_path
    from tunesmith.model.stops import set_stop_tokens

    torch.set_num_threads(threads)
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stops = set_stop_tokens(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return model, tokenizer, stops, pad


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    from tunesmith.eval.generate import prompt_ids

    return [prompt_ids(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            for i in range(count)]


class Client:
    """Keeps `concurrency` requests in flight on the engine, the next submitted the moment one ends, until every
    prompt is answered; measures the whole run and the part of it with all `concurrency` requests in flight
    (from the first submission to the last: afterwards fewer and fewer remain)."""

    def __init__(self, engine, prompts: list[list[int]], concurrency: int, max_new_tokens: int):
        self.engine, self.prompts, self.concurrency = engine, prompts, concurrency
        self.max_new_tokens = max_new_tokens
        self.answers: list[list[int]] = [[] for _ in prompts]
        self.submitted, self.first_token = [0.0] * len(prompts), [0.0] * len(prompts)
        self.next, self.left, self.tokens, self.error = 0, len(prompts), 0, None
        self.lock, self.done = threading.Lock(), threading.Event()

    def run(self) -> dict:
        self.start = self.mark()
        for _ in range(self.concurrency):
            self.submit_next()
        self.done.wait()
        if self.error:
            raise SystemExit(self.error)
        return {"concurrency": self.concurrency, "requests": len(self.prompts), "answers": self.answers,
                "ttft_median_s": statistics.median(self.first_token),
                "all": measure(self.start, self.mark()), "in_flight": measure(self.start, self.last_submit)}

    def mark(self) -> dict:
        return {"wall": time.perf_counter(), "cpu": time.process_time(), "tokens": self.tokens,
                "stats": dict(self.engine.stats)}

    def submit_next(self) -> None:
        from tunesmith.serve.engine import Job
        from tunesmith.serve.generation import Sampling

        with self.lock:
            i, self.next = self.next, self.next + 1
        if i == len(self.prompts) - 1:
            self.last_submit = self.mark()
        if i < len(self.prompts):
            self.submitted[i] = time.perf_counter()
            self.engine.submit([Job(self.prompts[i], self.max_new_tokens, Sampling(), None,
                                    partial(self.on_event, i))])

    def on_event(self, i: int, event: tuple) -> None:
        if event[0] == "error":
            self.error = f"request {i} failed: {event[1]}"
            self.done.set()
            return
        if not self.answers[i]:
            self.first_token[i] = time.perf_counter() - self.submitted[i]
        self.answers[i].append(event[1])
        self.tokens += 1
        if event[2] is not None:
            self.left -= 1
            if self.left == 0:
                self.done.set()
            self.submit_next()


def measure(start: dict, end: dict) -> dict:
    """Tokens/s (wall and CPU), mean running batch, ms per decode step and prefill's share of engine time between
    two marks."""
    stats = {k: end["stats"][k] - start["stats"][k] for k in ("steps", "step_rows", "decode_seconds",
                                                               "prefill_seconds")}
    tokens, steps = end["tokens"] - start["tokens"], max(1, stats["steps"])
    return {"tokens": tokens, "seconds": end["wall"] - start["wall"],
            "tokens_per_s": tokens / (end["wall"] - start["wall"]),
            "tokens_per_cpu_s": tokens / (end["cpu"] - start["cpu"]),
            "mean_batch": stats["step_rows"] / steps,
            "step_ms": 1000 * (stats["decode_seconds"] - stats["prefill_seconds"]) / steps,
            "prefill_share": stats["prefill_seconds"] / max(1e-9, stats["decode_seconds"])}


def eval_check(count: int, max_new_tokens: int, batch_size: int, threads: int) -> str:
    """`tunesmith eval`'s generation (continuous batching) next to what it ran before: transformers `generate`
    on left-padded batches of `batch_size`, cut at the first stop token. One line: how many answers agree."""
    from tunesmith.data.batching import left_pad
    from tunesmith.eval.generate import generate_token_ids

    model, tokenizer, stops, pad = load(threads)
    prompts = chat_prompts(tokenizer, count)
    before = []
    for start in range(0, count, batch_size):
        input_ids, attention_mask = left_pad(prompts[start:start + batch_size], pad)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad)[:, input_ids.shape[1]:]
        before += [next((row[:k] for k, t in enumerate(row) if t in stops), row) for row in out.tolist()]
    now = generate_token_ids(model, prompts, pad, max_new_tokens, batch_size)
    same = sum(a == b for a, b in zip(before, now))
    first = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(before, now) if a != b]
    return (f"eval generation: {same}/{count} greedy answers ({sum(map(len, now))} tokens) equal to transformers "
            f"generate's (batches of {batch_size}, {max_new_tokens} new tokens at most)"
            + (f"; the others first differ at tokens {first}" if first else ""))


def profile(rows: int, threads: int, steps: int = 10) -> str:
    """torch.profiler's table (top 8 operators by self CPU time) over `steps` decode steps of `rows` rows that
    have each generated 32 tokens; the prefill is left out."""
    from torch.profiler import profile as profiler

    from tunesmith.model.decode import Batch, Row

    model, tokenizer, stops, pad = load(threads)
    batch = Batch(model, [], pad)
    batch.add([Row(p, 32 + steps + 1) for p in chat_prompts(tokenizer, rows)])
    for _ in range(31):
        batch.step()
    with profiler() as prof:
        started = time.perf_counter()
        for _ in range(steps):
            batch.step()
        seconds = (time.perf_counter() - started) / steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    return f"{rows} rows, {threads} thread(s): {1000 * seconds:.0f} ms a step (profiled)\n{table}"


def run_repeats(args: argparse.Namespace) -> list[dict]:
    from tunesmith.serve.engine import Engine

    model, tokenizer, stops, pad = load(args.threads)
    prompts = chat_prompts(tokenizer, max(_requests(args, c) for c in args.levels))
    engine = Engine(model, stops, pad, max_batch_size=max(args.levels), max_queue=1024).start()
    Client(engine, prompts[:2], 2, 8).run()  # warm-up
    runs = []
    try:
        for repeat in range(args.repeats):
            for level in args.levels if repeat % 2 == 0 else args.levels[::-1]:
                load_before = os.getloadavg()[0]
                run = Client(engine, prompts[:_requests(args, level)], level, args.max_new_tokens).run()
                runs.append({**run, "repeat": repeat, "load": (load_before, os.getloadavg()[0])})
                m = run["in_flight"]
                print(f"repeat {repeat} C={level}: {m['tokens_per_s']:.1f} tokens/s with {level} in flight "
                      f"({run['all']['tokens_per_s']:.1f} over the whole run), mean batch {m['mean_batch']:.1f}, "
                      f"{m['step_ms']:.0f} ms a step, prefill {m['prefill_share']:.0%} of engine time, load "
                      f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        engine.close()
    return runs


def _requests(args: argparse.Namespace, level: int) -> int:
    return args.requests_per_level or (8 if level == 1 else max(16, 2 * level))


def summarise(runs: list[dict], args: argparse.Namespace) -> str:
    """A markdown table: per level, tokens/s with C requests in flight per repeat and median, its ratio to C = 1
    within each repeat, and the rest at the median."""
    lines = [f"threads {args.threads}, max_new_tokens {args.max_new_tokens}, {args.repeats} repeats", "",
             "| in flight | requests | tokens/s per repeat | x one at a time, per repeat | **x median** "
             "| x in tokens/CPU-s | whole run: tokens/s, x | mean batch | ms a step | prefill share "
             "| first token after | answers as at C=1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["repeat"]: r for r in runs if r["concurrency"] == 1}
    for level in args.levels:
        lines.append(_table_row(sorted((r for r in runs if r["concurrency"] == level), key=lambda r: r["repeat"]),
                                base))
    loads = [x for r in runs for x in r["load"]]
    lines += ["", f"load average (1 min) during the runs: {min(loads):.1f} to {max(loads):.1f} on "
              f"{os.cpu_count()} CPUs"]
    return "\n".join(lines)


def _table_row(mine: list[dict], base: dict[int, dict]) -> str:
    def ratios(kind: str, key: str) -> list[float]:
        return [r[kind][key] / base[r["repeat"]][kind][key] for r in mine]

    def median(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in mine)

    same = min(sum(a == b for a, b in zip(r["answers"], base[r["repeat"]]["answers"])) for r in mine)
    compared = min(len(mine[0]["answers"]), len(base[mine[0]["repeat"]]["answers"]))
    speeds = " / ".join(f"{r['in_flight']['tokens_per_s']:.1f}" for r in mine)
    speedups = " / ".join(f"{x:.2f}" for x in ratios("in_flight", "tokens_per_s"))
    return (f"| {mine[0]['concurrency']} | {mine[0]['requests']} | {speeds} | {speedups} "
            f"| **{statistics.median(ratios('in_flight', 'tokens_per_s')):.2f}** "
            f"| {statistics.median(ratios('in_flight', 'tokens_per_cpu_s')):.2f} "
            f"| {median('all', 'tokens_per_s'):.1f}, {statistics.median(ratios('all', 'tokens_per_s')):.2f} "
            f"| {median('in_flight', 'mean_batch'):.1f} | {median('in_flight', 'step_ms'):.0f} "
            f"| {median('in_flight', 'prefill_share'):.0%} "
            f"| {statistics.median(r['ttft_median_s'] for r in mine):.2f} s | {same}/{compared} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="requests in flight; 1 must be one")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--requests-per-level", type=int, default=0, help="0: 8 at C = 1, else 2 C (at least 16)")
    p.add_argument("--json", help="also write every run (answers included) to this file")
    p.add_argument("--eval-check", type=int, default=0, metavar="N",
                   help="instead: compare `tunesmith eval` generation with transformers generate on N prompts")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="instead: profile 10 decode steps of ROWS rows (torch.profiler, top operators)")
    args = p.parse_args(argv)
    if 1 not in args.levels:
        p.error("--levels must include 1: the ratios are to one request at a time")
    return args


def main() -> None:
    args = parse_args()
    if args.eval_check:
        print(eval_check(args.eval_check, args.max_new_tokens, 8, args.threads))
        return
    if args.profile:
        print(profile(args.profile, args.threads))
        return
    runs = run_repeats(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f)
    print(summarise(runs, args))


if __name__ == "__main__":
    main()
