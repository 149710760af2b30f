"""The benchmark scripts run: benchmarks/dpo_bench.py's tunesmith side on a tiny model (its TRL side takes
minutes and lives in docs/PERFORMANCE.md, not here)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def dpo_bench():
    spec = importlib.util.spec_from_file_location("dpo_bench", BENCHMARKS / "dpo_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dpo_bench_measures_every_step_of_a_tunesmith_run(dpo_bench, tmp_path):
    import tunesmith.train.loop as loop

    train_step = loop.train_step
    args = dpo_bench.parse_args(["--pairs", "6", "--vocab-size", "400", "--hidden-size", "32", "--layers", "2",
                                 "--heads", "2", "--intermediate-size", "64", "--batch", "2", "--steps", "3",
                                 "--warmup", "1"])
    dpo_bench.prepare(tmp_path, args)
    result = dpo_bench.run_one("tunesmith-dpo-precompute", tmp_path, args)

    # The tokens of each step are those of the pairs the sampler drew, in the order TRL is given them.
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    trl_rows = dpo_bench.trl_rows(tmp_path, args)
    assert sorted(r["prompt"][0]["content"] for r in trl_rows) == sorted(r["prompt"] for r in rows)
    assert len(result["step_tokens"]) == 3 and all(t > 0 for t in result["step_tokens"])
    assert result["losses"][0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at the first step
    assert result["tokens_per_s"] > 0 and result["peak_mb"] >= 0 and result["setup_mb"] is not None
    assert loop.train_step is train_step  # the timing wrapper is gone after the run
