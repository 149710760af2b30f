"""The fused loss's head alone at several chunk sizes: `head.LinearNLL` forward and backward over a frozen head.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/head_bench.py --threads 1

Random hidden states (loss positions x width) and a random frozen head (vocabulary x width) of Gemma 3 270M's and
SmolLM2-135M's shapes, the loss positions of a step of benchmarks/sft_bench.py --model. Each chunk size runs three
times; the table gives the fastest and its FLOP rate (4 x positions x width x vocabulary: the logits and the
hidden states' gradient). The default (`head.chunk_rows`) is marked.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"gemma3-270m": (262_144, 640, 937), "smollm2-135m": (49_152, 576, 1_090)}


def seconds(vocab: int, width: int, positions: int, rows: int, calls: int = 3) -> float:
    """The fastest of `calls` forward + backward passes of LinearNLL with `rows` rows a chunk."""
    from tunesmith.objectives.head import LinearNLL

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, width, generator=generator) * width**-0.5
    hidden = torch.randn(positions, width, generator=generator)
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    best = float("inf")
    for _ in range(calls):
        h = hidden.clone().requires_grad_(True)
        start = time.perf_counter()
        LinearNLL.apply(h, weight, None, targets, rows).backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict[tuple[str, int], float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--positions", type=int, help="loss positions instead of the shape's")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tunesmith.objectives.head import chunk_rows

    print("| head | vocabulary x width, positions | rows a chunk | s (fastest of 3) | GFLOP/s |")
    print("|---|---|---|---|---|")
    results = {}
    for name in args.shapes:
        vocab, width, positions = SHAPES[name]
        positions = args.positions or positions
        default = chunk_rows(vocab)
        for rows in sorted({*args.rows, default}):
            results[name, rows] = t = seconds(vocab, width, positions, rows)
            mark = " (default)" if rows == default else ""
            print(f"| {name} | {vocab:,} x {width}, {positions:,} | {rows}{mark} | {t:.2f} | "
                  f"{4 * positions * width * vocab / t / 1e9:.1f} |")
    return results


if __name__ == "__main__":
    main()
