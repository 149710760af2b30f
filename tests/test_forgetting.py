"""Forgetting seen while training: general sets scored before step 1 and at every validation pass; a drop beyond
eval.forgetting_max_drop warns on the terminal and in the report, or stops the run keeping the last good pass."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.train.forgetting import ForgettingGuard, Headline, headline


def test_drops_are_points_of_each_scale():
    assert Headline("exact_match", 0.80).drop_from(Headline("exact_match", 0.93)) == pytest.approx(13.0)
    assert Headline("bleu", 35.0).drop_from(Headline("bleu", 40.0)) == pytest.approx(5.0)
    assert Headline("perplexity", 12.0, False).drop_from(Headline("perplexity", 10.0, False)) == pytest.approx(20.0)
    assert Headline("accuracy", 0.9).drop_from(Headline("accuracy", 0.5)) == pytest.approx(-40.0)  # improved


def test_headline_of_each_kind():
    assert headline({"kind": "loss", "metrics": {"loss": 2.0, "perplexity": 7.4, "n": 3}}) == \
        Headline("perplexity", 7.4, False)
    assert headline({"kind": "choice", "metrics": {"accuracy": 0.5, "n": 4}}) == Headline("accuracy", 0.5)
    assert headline({"kind": "generate", "metrics": {"n": 4, "rouge_l": 0.3, "exact_match": 0.25}}) == \
        Headline("rouge_l", 0.3)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_guard_warns_beyond_the_limit_only():
    scores = iter([0.90, 0.85, 0.70])
    guard = ForgettingGuard(lambda model: {"facts": {"kind": "choice", "metrics": {"accuracy": next(scores)}}},
                            max_drop=10.0)
    assert guard.start(None) == {"general_facts_accuracy": 0.90}
    records = _Records()  # on the module's logger itself: "tunesmith" may not propagate to the root
    logger = logging.getLogger("tunesmith.train.forgetting")
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.WARNING)  # an earlier command may have set "tunesmith" to errors only
    try:
        metrics, tripped = guard.check(None, step=5)
        assert not tripped and metrics["general_facts_drop"] == pytest.approx(5.0) and not records.messages
        metrics, tripped = guard.check(None, step=10)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert tripped and metrics == {"general_facts_accuracy": 0.70, "general_facts_drop": pytest.approx(20.0)}
    assert len(records.messages) == 1 and records.messages[0].startswith(
        "forgetting at step 10: general set facts accuracy 0.9000 -> 0.7000 (20.0 points lost")
    assert guard.summary() == {"facts": {"metric": "accuracy", "before": 0.90, "largest_drop": pytest.approx(20.0),
                                         "exceeded": True}}


def _run_config(model_dir, tmp_path, on_forgetting: str, max_drop: float):
    tmp_path.mkdir(parents=True, exist_ok=True)
    digits = write_jsonl(tmp_path / "digits.jsonl", [{"text": " ".join(str((i * 7 + k) % 10) for k in range(40))}
                                                     for i in range(32)])
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"text": "The capital of France is Paris. The capital of Peru is Lima."},
        {"text": "You are a helpful assistant. Answer briefly and politely."},
        {"text": "Hello world, this is a small test corpus for a tiny tokenizer."}])
    return config_from_dict({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(digits)], "max_seq_len": 48, "cache_dir": str(tmp_path / "cache")},
        "strategy": {"name": "full"},
        "train": {"objective": "clm", "output_dir": str(tmp_path / "run"), "max_steps": 8, "micro_batch_size": 8,
                  "lr": 3e-2, "warmup_ratio": 0.0, "save_every": None},
        "eval": {"every": 2, "sets": [{"name": "general", "path": str(general), "kind": "loss"}],
                 "general": ["general"], "forgetting_max_drop": max_drop, "on_forgetting": on_forgetting},
        "tracking": {"progress_bar": False}})


def test_a_run_that_forgets_warns_and_reports_it(model_dirs, tmp_path, capfd):
    from tunesmith.train.run import train

    report = train(_run_config(model_dirs["llama"], tmp_path, "warn", 10.0))
    assert report["steps"] == 8  # warned, not stopped
    f = report["forgetting"]["sets"]["general"]
    assert f["metric"] == "perplexity" and f["exceeded"] and f["largest_drop"] > 10.0
    assert "forgetting at step" in capfd.readouterr().out  # on the terminal
    assert "forgetting at step" in (tmp_path / "run" / "train.log").read_text()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "general_general_perplexity" in records[0]
    assert [r["step"] for r in records if "eval_general_general_drop" in r] == [2, 4, 6, 8]
    assert "Forgetting, general set general: perplexity" in (tmp_path / "run" / "report.md").read_text()
    # a checkpoint keeps the scores before training, so a resumed run compares with them, not with its own start
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-8" / "state.json").read_text())
    assert state["forgetting_baseline"] == {"general": ["perplexity", records[0]["general_general_perplexity"],
                                                        False]}
    guard = ForgettingGuard(lambda model: {}, 10.0)
    guard.restore_baseline(state["forgetting_baseline"])
    assert guard.baseline == {"general": Headline("perplexity", records[0]["general_general_perplexity"], False)}


def test_stop_keeps_the_last_pass_within_the_limit(model_dirs, tmp_path):
    from tunesmith.train.run import train

    probe = train(_run_config(model_dirs["llama"], tmp_path / "probe", "warn", 1e9))  # the drop at each pass
    drops = [json.loads(line).get("eval_general_general_drop") for line in
             (tmp_path / "probe" / "run" / "metrics.jsonl").read_text().splitlines()]
    drops = [d for d in drops if d is not None]
    assert probe["steps"] == 8 and len(drops) == 4 and drops[0] < drops[-1]
    limit = (drops[0] + drops[-1]) / 2  # the first pass is within it, the last is not
    trip = next(i for i, d in enumerate(drops) if d > limit)
    report = train(_run_config(model_dirs["llama"], tmp_path, "stop", limit))
    assert report["steps"] == 2 * (trip + 1) and report["forgetting"]["stopped"]
    last_good = report["forgetting"]["last_good"]
    assert last_good.endswith(f"step-{2 * trip}")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    kept = load_file(f"{last_good}/trainable.safetensors")
    shared = [k for k in kept if k in final]
    assert len(shared) == len(kept) > 0 and all(torch.equal(final[k], kept[k]) for k in shared)
