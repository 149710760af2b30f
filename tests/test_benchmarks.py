"""The benchmark scripts run: benchmarks/dpo_bench.py's tunesmith side on a tiny model (its TRL side takes
minutes and lives in docs/PERFORMANCE.md, not here), and benchmarks/scaling_bench.py's three loss paths."""

from __future__ import annotations

import json
import math
import re

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def dpo_bench():
    return load_benchmark("dpo_bench")


def test_dpo_bench_measures_every_step_of_a_tunesmith_run(dpo_bench, tmp_path):
    import tunesmith.train.loop as loop

    train_step = loop.train_step
    args = dpo_bench.parse_args(["--pairs", "6", "--vocab-size", "400", "--hidden-size", "32", "--layers", "2",
                                 "--heads", "2", "--intermediate-size", "64", "--batch", "2", "--steps", "3",
                                 "--warmup", "1", "--profile"])
    dpo_bench.prepare(tmp_path, args)
    result = dpo_bench.run_one("tunesmith-dpo-precompute", tmp_path, args)

    # The tokens of each step are those of the pairs the sampler drew, in the order TRL is given them.
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    trl_rows = dpo_bench.trl_rows(tmp_path, args)
    assert sorted(r["prompt"][0]["content"] for r in trl_rows) == sorted(r["prompt"] for r in rows)
    assert len(result["step_tokens"]) == 3 and all(t > 0 for t in result["step_tokens"])
    assert result["losses"][0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at the first step
    assert result["tokens_per_s"] > 0 and result["peak_mb"] >= 0 and result["setup_mb"] is not None
    # What the model FLOPs count: the positions the model ran, each pair's prompt once (the case is padding-free),
    # fewer than the pairs' tokens the meter counts in every step.
    assert all(w["tokens"] < t for w, t in zip(result["step_work"], result["step_tokens"]))
    assert "aten::" in result["profile"] and "Self CPU" in result["profile"]  # --profile: the last step's table
    assert loop.train_step is train_step  # the timing wrapper is gone after the run


def test_scaling_bench_paths_train_the_same_steps(tmp_path):
    """The fused, logits and naive paths of one point: the same loss at every step (they compute one objective on
    the same model and rows), the tokens of every step counted, a memory figure."""
    scaling = load_benchmark("scaling_bench")
    args = scaling.parse_args(["--tokens", "64", "--steps", "2", "--threads", "1"])
    runs = {path: scaling.run_point(path, 300, 32, args) for path in scaling.PATHS}
    for r in runs.values():
        assert r["rows"] == 2 and r["step_tokens"] == [62, 62] and r["tokens_per_s"] > 0 and r["peak_mb"] >= 0
        assert r["model_flops_per_s"] > 0 and r["share_of_ceiling"] > 0  # distance to the limit
    assert runs["fused"]["losses"] == pytest.approx(runs["naive"]["losses"], rel=1e-5)
    assert runs["logits"]["losses"] == pytest.approx(runs["naive"]["losses"], rel=1e-5)
    assert runs["naive"]["losses"][0] == pytest.approx(math.log(300), rel=0.05)  # a random model: near uniform
    # Every weight trained: the same first loss (LoRA starts as the identity), more FLOPs per token (6N vs 4N).
    full = scaling.run_point("fused", 300, 32, args, "full")
    assert full["losses"][0] == pytest.approx(runs["fused"]["losses"][0], rel=1e-6)
    assert full["flops_per_step"] > runs["fused"]["flops_per_step"] and full["share_of_ceiling"] > 0


def test_the_gpu_script_is_ready(tmp_path):
    """benchmarks/gpu_check.sh cannot run without a GPU; here: its shell parses, the options it gives the benchmark
    scripts are theirs, and deepspeed_check.py's configs load (the DeepSpeed ones included)."""
    import re
    import shlex
    import subprocess
    from pathlib import Path

    from tunesmith.config import load_config

    script = Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    values = {}
    for name, value in re.findall(r'^(SHAPE|MFU_ARGS|TRL_ARGS)="(.*?)"$', script.read_text(), re.M | re.S):
        values[name] = value.replace("\\\n", " ").replace("$SHAPE", values.get("SHAPE", ""))
    assert load_benchmark("scaling_bench").parse_args(shlex.split(values["MFU_ARGS"])).device == "cuda"
    assert "trl-qlora-best" in load_benchmark("sft_bench").parse_args(shlex.split(values["TRL_ARGS"])).cases
    ds = load_benchmark("deepspeed_check")
    for name, zero in (("plain", None), ("zero2", 2), ("zero3", 3)):
        cfg = load_config(ds.config(tmp_path, name, zero))
        assert cfg.train.distributed.strategy == ("deepspeed" if zero else "ddp")


def test_grpo_bench_times_both_layouts_on_the_same_loss(model_dirs, capsys):
    """benchmarks/grpo_bench.py on the tiny Llama: the padded and the padding-free update give the same loss, and
    the padding-free row holds each prompt once."""
    losses = load_benchmark("grpo_bench").main(["--model", str(model_dirs["llama"]), "--prompts", "2", "--group", "3",
                                                 "--prompt-tokens", "12", "--max-new", "20", "--repeats", "1"])
    assert losses["padded"] == pytest.approx(losses["padding-free, shared prompts"], rel=1e-5)
    out = capsys.readouterr().out
    found = re.search(r"(\d+) tokens; positions: padded (\d+), padding-free (\d+)", out)
    tokens, padded, flat = map(int, found.groups())
    assert flat == tokens - 2 * (3 - 1) * (12 - 1)  # each prompt but its last token once per group, not 3 times
    assert padded % 6 == 0 and padded > tokens and "speed-up per repeat" in out


def test_head_bench_times_the_chunk_sizes():
    """benchmarks/head_bench.py with few positions: every chunk size asked for and the default are timed."""
    results = load_benchmark("head_bench").main(["--shapes", "smollm2-135m", "--positions", "40", "--rows", "8",
                                                 "32"])
    assert set(results) == {("smollm2-135m", 8), ("smollm2-135m", 32), ("smollm2-135m", 170)}
    assert all(t > 0 for t in results.values())
