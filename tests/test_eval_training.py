"""Evaluation during training: generation metrics on a sample, the best checkpoint, early stopping."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError
from tunesmith.track.metrics import read_metrics
from tunesmith.train.best import BestTracker
from tunesmith.train.run import train


def run_config(model_dir, data_file, out, **sections) -> dict:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(data_file)], "template": "chatml", "max_seq_len": 256, "split": {"validation": 4}},
        "strategy": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
        "train": {"output_dir": str(out), "max_steps": 6, "micro_batch_size": 4, "lr": 1e-3, "seed": 7,
                  "keep_last": 1},
        "eval": {"every": 2},
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(20))


def test_validation_passes_add_generation_metrics_on_a_sample(model_dirs, data, tmp_path):
    cfg = run_config(model_dirs["llama"], data, tmp_path / "run",
                     eval={"every": 3, "generate_samples": 2, "generate_metrics": ["exact_match", "rouge_l"],
                           "max_new_tokens": 4})
    report = train(config_from_dict(cfg))
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert 0.0 <= r["eval_exact_match"] <= 1.0 and 0.0 <= r["eval_rouge_l"] <= 1.0
    assert set(report["eval_metrics"]) == {"exact_match", "rouge_l"}


def test_the_best_checkpoint_survives_pruning_and_can_become_final(model_dirs, data, tmp_path):
    """best_mode=max on a falling loss: the first pass stays the best, so its checkpoint is kept although
    keep_last=1 would prune it, and load_best_at_end puts its weights in final/."""
    cfg = run_config(model_dirs["llama"], data, tmp_path / "run",
                     eval={"every": 2, "best_metric": "eval_loss", "best_mode": "max", "load_best_at_end": True})
    report = train(config_from_dict(cfg))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-2", "step-6"]
    best = json.loads((checkpoints / "best.json").read_text())
    assert best["best_step"] == 2 and [s for s, _ in best["history"]] == [2, 4, 6]
    assert report["best"]["step"] == 2
    saved = load_file(checkpoints / "step-2" / "trainable.safetensors")
    final = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    lora = {k: v for k, v in saved.items() if "lora_" in k}
    assert lora and all(any(torch.equal(v, w) for w in final.values()) for v in lora.values())


def test_early_stopping_after_patience_passes_without_improvement(model_dirs, data, tmp_path):
    cfg = run_config(model_dirs["llama"], data, tmp_path / "run", train={"max_steps": 20},
                     eval={"every": 2, "best_metric": "loss", "best_mode": "max", "early_stopping_patience": 2})
    report = train(config_from_dict(cfg))
    assert report["steps"] == 6  # best at 2, no improvement at 4 and 6
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert records[-1]["step"] == 6
    assert (tmp_path / "run" / "checkpoints" / "step-6").is_dir()


def test_best_history_after_the_resumed_step_is_dropped(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"metric": "eval_loss", "history": [[2, 1.0], [4, 0.5], [6, 0.7]]}))
    tracker = BestTracker.create("eval_loss", "auto", 3, tmp_path, resume_step=4)
    assert tracker.mode == "min" and tracker.history == [(2, 1.0), (4, 0.5)]
    assert tracker.update(6, {"eval_loss": 0.4}) and tracker.best == (6, 0.4)
    assert not tracker.update(8, {"eval_loss": 0.4})  # a tie is not an improvement
    with pytest.raises(ConfigError, match="eval.best_metric: 'eval_accuracy'"):
        BestTracker.create("accuracy", "auto", None, tmp_path).update(2, {"eval_loss": 1.0})


def test_early_stopping_needs_a_metric_and_validation_data(model_dirs, data, tmp_path):
    cfg = run_config(model_dirs["llama"], data, tmp_path / "run", eval={"early_stopping_patience": 2})
    with pytest.raises(ConfigError, match="needs eval.best_metric"):
        config_from_dict(cfg)
    cfg = run_config(model_dirs["llama"], data, tmp_path / "run", eval={"best_metric": "loss"},
                     data={"split": {"validation": 0}})
    with pytest.raises(ConfigError, match="needs validation data"):
        config_from_dict(cfg)
