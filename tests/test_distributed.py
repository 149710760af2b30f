"""Multi-process training on CPU (gloo) through `tunesmith train --nproc`: the same run as one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl


def _config(path, model_dir, data, out, micro, accum, cache) -> str:
    cfg = {"model": {"name_or_path": str(model_dir)},
           "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 256, "cache_dir": str(cache)},
           "strategy": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
           "train": {"output_dir": str(out), "epochs": 2, "micro_batch_size": micro, "grad_accum": accum,
                     "lr": 1e-3, "seed": 7},
           "tracking": {"progress_bar": False, "log_level": "warning"}}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(model_dirs, tmp_path):
    """20 examples, 2 processes x micro-batch 3 x accumulation 2 against 1 process x 3 x 4: the same examples
    in every step, including the epoch's last window, where the second process has nothing left and runs a
    padding micro-batch. Same losses and final adapter within 1e-5; only the first process writes."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    one = _config(tmp_path / "one.yaml", model_dirs["llama"], data, tmp_path / "one", 3, 4, tmp_path / "cache")
    two = _config(tmp_path / "two.yaml", model_dirs["llama"], data, tmp_path / "two", 3, 2, tmp_path / "cache")
    for config, extra in ((one, []), (two, ["--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "tunesmith", "train", config, *extra], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    losses_one, losses_two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(losses_one) == 4
    assert losses_two == pytest.approx(losses_one, rel=1e-5)  # one line per step: only one process wrote
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
