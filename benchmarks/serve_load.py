"""Load-test `tunesmith serve` over loopback: N requests from C concurrent clients; latency and throughput.

    .venv/bin/python benchmarks/serve_load.py --requests 500 --concurrency 32
    .venv/bin/python benchmarks/serve_load.py --requests 500 --concurrency 64 --max-queue 8    # overload: 429s
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME        # a running server

Without --url it builds a tiny random Llama (2 layers, width 64, a 400-token byte-level BPE with the chatml
template) in a temporary directory, starts `python -m tunesmith serve` on it in a subprocess (port 0), runs the
load, then sends SIGTERM and reports the exit code and how long the server took to stop.
The load mixes chat (half), streamed chat (a quarter) and completions (a quarter), each asking for
--max-tokens tokens (a random model rarely stops earlier). Latency is from sending a request to its last byte
(for a stream, to [DONE]); a 429 counts as refused, any other non-200 status, error chunk or transport error
as a failure. The client is httpx's async client; it runs on the same machine as the server and shares its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPT = [{"role": "user", "content": "What is two plus three?"}]


def tiny_model(folder: Path) -> Path:
    """A random tiny Llama and its tokenizer (with the chatml template), saved like a hub checkpoint."""
    from tunesmith.data.templates import install_template
    from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer

    corpus = ["What is two plus three? It is five. The capital of France is Paris.",
              "You are a helpful assistant. Answer briefly and politely.",
              "system user assistant 0 1 2 3 4 5 6 7 8 9 10"] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    install_template(tokenizer, "chatml")
    return save_tiny(folder / "tiny-llama", build_model("llama", len(tokenizer), seed=0), tokenizer)


def start_server(model: Path, args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tunesmith", "serve", str(model), "--port", "0",
               "--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
               "--max-tokens-limit", str(max(args.max_tokens, 16))]
    if args.server_threads:
        command += ["--threads", str(args.server_threads)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    match = re.search(r"http://(127\.0\.0\.1:\d+)/v1", proc.stdout.readline())
    if not match:
        proc.kill()
        sys.exit("the server did not start")
    return proc, f"http://{match.group(1)}"


def stop_server(proc: subprocess.Popen) -> dict:
    """SIGTERM; the exit code, the seconds until the server printed "stopped" (engine joined, port closed) and
    until the process ended (the rest is the interpreter and native libraries tearing down)."""
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    line = proc.stdout.readline()
    stopped = time.perf_counter() - started
    code = proc.wait(timeout=60)
    return {"server_exit_code": code, "server_said": line.strip(), "stopped_s": round(stopped, 2),
            "exit_s": round(time.perf_counter() - started, 2)}


def request_for(i: int, model: str, max_tokens: int) -> tuple[str, dict]:
    kind = ("chat", "stream", "chat", "completion")[i % 4]
    if kind == "completion":
        return "/v1/completions", {"model": model, "prompt": "The capital of France is", "max_tokens": max_tokens,
                                   "temperature": 0}
    return "/v1/chat/completions", {"model": model, "messages": PROMPT, "max_tokens": max_tokens,
                                    "temperature": 0, "stream": kind == "stream",
                                    **({"stream_options": {"include_usage": True}} if kind == "stream" else {})}


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, float, int]:
    """(outcome: "ok", "refused" or a failure's description, seconds, completion tokens)."""
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            raw = (await response.aread()).decode()
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}", time.perf_counter() - started, 0
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return ("refused" if response.status_code == 429 else f"status {response.status_code}: {raw[:200]}",
                seconds, 0)
    if body.get("stream"):
        events = [json.loads(line[6:]) for line in raw.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        if any("error" in e for e in events) or not raw.rstrip().endswith("data: [DONE]"):
            return f"stream failed: {raw[-200:]}", seconds, 0
        return "ok", seconds, events[-1]["usage"]["completion_tokens"]
    return "ok", seconds, json.loads(raw)["usage"]["completion_tokens"]


async def load(base_url: str, model: str, total: int, concurrency: int, max_tokens: int, api_key: str | None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[tuple[str, float, int]] = []
    pending = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300, limits=limits) as client:
        async def worker():
            for i in pending:
                path, body = request_for(i, model, max_tokens)
                results.append(await one(client, path, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return results, wall


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def report(results, wall: float, args) -> dict:
    ok = [(s, t) for outcome, s, t in results if outcome == "ok"]
    failures = [outcome for outcome, _, _ in results if outcome not in ("ok", "refused")]
    latencies = [s for s, _ in ok]
    refused = [s for outcome, s, _ in results if outcome == "refused"]
    summary = {"requests": len(results), "concurrency": args.concurrency, "ok": len(ok),
               "refused_429": len(refused), "failures": len(failures),
               "p50_ms": round(1000 * percentile(latencies, 50), 1) if ok else None,
               "p90_ms": round(1000 * percentile(latencies, 90), 1) if ok else None,
               "p99_ms": round(1000 * percentile(latencies, 99), 1) if ok else None,
               "refused_p50_ms": round(1000 * percentile(refused, 50), 1) if refused else None,
               "refused_max_ms": round(1000 * max(refused), 1) if refused else None,
               "requests_per_s": round(len(ok) / wall, 1), "tokens_per_s": round(sum(t for _, t in ok) / wall, 1),
               "wall_s": round(wall, 2), "max_batch_size": args.max_batch_size, "max_queue": args.max_queue,
               "max_tokens": args.max_tokens, "server_threads": args.server_threads,
               "load_average": round(os.getloadavg()[0], 2)}
    for failure in failures[:5]:
        print("failure:", failure, file=sys.stderr)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens each request asks for")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's (when this script starts it)")
    parser.add_argument("--max-queue", type=int, default=256, help="the server's (when this script starts it)")
    parser.add_argument("--server-threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--url", default=None, help="load a running server instead of starting one")
    parser.add_argument("--model", default="tiny-llama", help="the model name to request (with --url)")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        proc, url = (None, args.url) if args.url else start_server(tiny_model(Path(folder)), args)
        try:
            results, wall = asyncio.run(load(url, args.model, args.requests, args.concurrency, args.max_tokens,
                                             args.api_key))
        finally:
            stopped = stop_server(proc) if proc is not None else {}
        summary = {**report(results, wall, args), **stopped}
    print(json.dumps(summary))
    print(f"{summary['requests']} requests at {args.concurrency} concurrent: {summary['ok']} ok, "
          f"{summary['refused_429']} refused (429), {summary['failures']} failed; p50 {summary['p50_ms']} ms, "
          f"p99 {summary['p99_ms']} ms; {summary['requests_per_s']} requests/s, {summary['tokens_per_s']} tokens/s")


if __name__ == "__main__":
    main()
