"""What lets `tunesmith estimate` run without torch and transformers: the CPU rate kept per machine and block
shape, the prepared tables read with pyarrow, the loss's chunk sizes copied from the objectives, the shape from
config.json's fields, and the GPU check that asks torch only where a GPU driver is present."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys

import pytest
from datasets import load_from_disk

from conftest import chat_rows, write_jsonl
from tunesmith import hardware
from tunesmith.config import config_from_dict
from tunesmith.data.arrow import read_table
from tunesmith.model.run_tokenizer import build_tokenizer
from tunesmith.model.build import architecture
from tunesmith.objectives import head, tokens
from tunesmith.train.estimate import cpu_rate, logits, model_shape
from tunesmith.train.estimate.command import config_fields, run_model_shape
from tunesmith.train.estimate.from_config import weight_bytes_of

BLOCK = {"model_type": "llama", "block_linears": {"q_proj": [64, 64]}, "rows": 1, "length": 8}


def test_the_loss_chunk_sizes_are_the_objectives():
    assert (logits.FUSED_CHUNK, logits.FUSED_MIN_ROWS) == (head.CHUNK_ELEMENTS, head.MIN_CHUNK_ROWS)
    assert logits.LOSS_CHUNK == inspect.signature(tokens.token_logps).parameters["chunk_size"].default


def test_a_rate_is_measured_once_and_kept(tmp_path):
    calls = []
    measure = lambda: calls.append(1) or 123.0e9  # noqa: E731
    path = tmp_path / "rates.json"
    first = cpu_rate.cached_rate(BLOCK, measure, path)
    second = cpu_rate.cached_rate(BLOCK, measure, path)
    assert first == second and first[0] == 123.0e9 and "load average" in first[1] and calls == [1]
    assert cpu_rate.cached_rate(BLOCK | {"length": 16}, lambda: 7.0, path)[0] == 7.0  # another shape: measured
    assert len(json.loads(path.read_text())) == 2


def test_a_rate_measured_on_a_busier_machine_is_measured_again(tmp_path):
    path = tmp_path / "rates.json"
    cpu_rate.cached_rate(BLOCK, lambda: 1.0, path)
    rates = json.loads(path.read_text())
    (entry,) = rates.values()
    entry["load"] = 1000.0  # far busier than now
    path.write_text(json.dumps(rates))
    assert cpu_rate.cached_rate(BLOCK, lambda: 2.0, path)[0] == 2.0
    assert cpu_rate.cached_rate(BLOCK, lambda: 3.0, path)[0] == 2.0  # measured at about today's load: kept


def test_the_key_follows_threads_and_the_wait_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = cpu_rate.rate_key(BLOCK)
    assert cpu_rate.expected_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_rate.expected_threads() == 3 and cpu_rate.rate_key(BLOCK) != one
    three = cpu_rate.rate_key(BLOCK)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert cpu_rate.rate_key(BLOCK) not in (one, three)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    info = hardware.cpu_info()
    assert cpu_rate.expected_threads() == (info["physical_cores"] or info["usable_cores"])


def test_torch_agrees_on_the_threads(monkeypatch):
    """Without OMP_NUM_THREADS, torch's default is one thread per physical core: what the key assumes."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert int(out.stdout) == cpu_rate.expected_threads()


def test_an_unreadable_rates_file_is_measured_again_and_rewritten(tmp_path, caplog):
    path = tmp_path / "rates.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert cpu_rate.cached_rate(BLOCK, lambda: 5.0, path)[0] == 5.0
    assert "not a file of CPU rates" in caplog.text
    assert list(json.loads(path.read_text()).values())[0]["flops"] == 5.0


def test_no_gpu_is_seen_without_a_driver_or_with_cuda_hidden(monkeypatch):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.may_have_gpu() is False and hardware.cuda_available() is False
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    if not hardware.may_have_gpu():  # no driver here: torch must agree
        assert torch.cuda.is_available() is False
    assert hardware.cuda_available() == torch.cuda.is_available()


def test_weight_bytes_of_each_dtype():
    assert [weight_bytes_of(d, "cpu") for d in ("auto", "fp32", "bf16", "fp16")] == [4, 4, 2, 2]


def test_read_table_is_what_datasets_reads(tmp_path):
    from datasets import Dataset

    rows = [{"input_ids": [1, 2, i], "labels": [-100, 2, i]} for i in range(5)]
    Dataset.from_list(rows).save_to_disk(tmp_path / "d", num_shards=2)
    assert len(json.loads((tmp_path / "d" / "state.json").read_text())["_data_files"]) > 1  # several shards
    assert read_table(tmp_path / "d").equals(load_from_disk(str(tmp_path / "d")).data.table)


@pytest.mark.parametrize("model", ["checkpoint", "init"])
def test_the_run_shape_from_fields_equals_the_meta_device_count(tmp_path, model_dirs, model):
    write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    source = ({"name_or_path": str(model_dirs["llama"])} if model == "checkpoint" else
              {"tokenizer": str(model_dirs["llama"]), "init": {"family": "gpt2", "hidden_size": 32, "num_layers": 2}})
    cfg = config_from_dict({"model": source, "data": {"train": [str(tmp_path / "d.jsonl")], "template": "chatml"},
                            "strategy": {"name": "full"}, "train": {"output_dir": str(tmp_path / "run")}})
    tokenizer, _ = build_tokenizer(cfg, light=True)
    assert config_fields(cfg, tokenizer) is not None
    assert run_model_shape(cfg, tokenizer) == model_shape(architecture(cfg, tokenizer), len(tokenizer))
