"""Speed and memory switches: each changes how a step is computed, not what it computes (within precision)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.data.tokenize import Example
from tunesmith.errors import ConfigError
from tunesmith.objectives import build_objective
from tunesmith.track.metrics import read_metrics
from tunesmith.train import distributed
from tunesmith.train.probe import longest_examples, probe_memory
from tunesmith.train.run import train


def run_config(model_dir, data, out, **train_keys) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 256},
        "strategy": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
        "train": {"output_dir": str(out), "max_steps": 3, "micro_batch_size": 4, "lr": 1e-3, "seed": 7,
                  **train_keys},
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(12))


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_gradient_checkpointing_gives_the_same_losses_and_weights(model_dirs, data, tmp_path):
    for name, on in (("plain", False), ("checkpointed", True)):
        train(config_from_dict(run_config(model_dirs["llama"], data, tmp_path / name, gradient_checkpointing=on)))
    assert _losses(tmp_path / "checkpointed") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-6)
    a = load_file(tmp_path / "plain" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "checkpointed" / "final" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_bf16_autocast_on_cpu_keeps_fp32_weights_and_close_losses(model_dirs, data, tmp_path, monkeypatch):
    """On a CPU with bf16 instructions (patched in: the test machines have none)."""
    monkeypatch.setattr(distributed, "cpu_info", lambda: {"bf16": True})
    for name, precision in (("fp32", "no"), ("bf16", "bf16")):
        train(config_from_dict(run_config(model_dirs["llama"], data, tmp_path / name, mixed_precision=precision)))
    assert _losses(tmp_path / "bf16") == pytest.approx(_losses(tmp_path / "fp32"), rel=2e-2)
    assert _losses(tmp_path / "bf16") != _losses(tmp_path / "fp32")  # bf16 really was used
    saved = load_file(tmp_path / "bf16" / "final" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # master weights stay fp32


@pytest.mark.parametrize(("flags", "expected"), [({"bf16": False}, "no"), ({"bf16": True}, "bf16"),
                                                 ({"bf16": None}, "bf16")])
def test_bf16_falls_back_to_fp32_on_a_cpu_without_bf16_instructions(flags, expected, monkeypatch, caplog):
    monkeypatch.setattr(distributed, "cpu_info", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.cpu_mixed_precision("bf16") == expected
    assert distributed.cpu_mixed_precision("no") == "no"
    said = [r.getMessage() for r in caplog.records if "AVX512-BF16" in r.getMessage()]
    assert len(said) == (1 if expected == "no" else 0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler")
@pytest.mark.skipif(not os.environ.get("TUNESMITH_TEST_COMPILE"),
                    reason="compiling on CPU takes minutes; set TUNESMITH_TEST_COMPILE=1 to run")
def test_compiled_model_gives_the_same_losses(model_dirs, data, tmp_path):
    for name, on in (("eager", False), ("compiled", True)):
        train(config_from_dict(run_config(model_dirs["llama"], data, tmp_path / name, compile=on)))
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)


def test_the_probe_takes_the_longest_examples_and_names_the_settings_to_change():
    examples = [Example([1] * n, [1] * n) for n in (3, 9, 5, 9, 1)]
    assert longest_examples(examples, 2) == [1, 3]
    pair = Example([1] * 2, [1] * 2, rejected_ids=[1] * 20, rejected_labels=[1] * 20)
    assert longest_examples(examples + [pair], 1) == [5]

    class Accelerator:
        device = torch.device("cpu")

    def out_of_memory(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    objective = build_objective("sft")
    objective = type(objective)(out_of_memory, objective.count_units, objective.collate)
    with pytest.raises(ConfigError, match=r"longest micro-batch \(2 x 9 tokens\).*lower train.micro_batch_size"):
        probe_memory(torch.nn.Linear(1, 1), objective, examples, 2, 0, Accelerator(),
                     "lower train.micro_batch_size (now 2)")
