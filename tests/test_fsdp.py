"""FSDP2 (train.distributed.strategy=fsdp) on CPU over gloo: 2 sharded processes train like 1 process with
twice the accumulation; sharded checkpoints are atomic and resume; the final adapter / model is whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from tunesmith.model.trainable import verify
from tunesmith.train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

# 20 examples, 5 held out for validation, micro-batch 3: 2 processes x accumulation 2 see the same 6-example
# micro-batch pairs per step as 1 process x accumulation 4, also in each epoch's last, short window. 2 epochs = 4
# optimizer steps.
TOLERANCE = 1e-5


def _config(path, model_dir, data, out, accum, strategy, distributed, cache) -> str:
    cfg = {"model": {"name_or_path": str(model_dir)},
           "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 256, "cache_dir": str(cache),
                    "split": {"validation": 5}},
           "eval": {"batch_size": 2},  # 3 validation batches: one process has 2, the other 1 (and a padding one)
           "strategy": {"name": strategy, "lora": {"r": 4, "alpha": 8}},
           "train": {"output_dir": str(out), "epochs": 2, "micro_batch_size": 3, "grad_accum": accum,
                     "lr": 1e-3, "seed": 7, "save_every": 2, "keep_last": 5, "distributed": distributed},
           "tracking": {"progress_bar": False, "log_level": "warning"}}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _train(config: str, *extra: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", config, *extra], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def _max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _runs(tmp_path_factory, model_dir, strategy: str) -> dict:
    """The same training with 1 process (accumulation 4) and with 2 FSDP processes (accumulation 2)."""
    root = tmp_path_factory.mktemp(f"fsdp-{strategy}")
    data = write_jsonl(root / "chat.jsonl", chat_rows(20))
    configs = {
        "one": _config(root / "one.yaml", model_dir, data, root / "one", 4, strategy, {}, root / "cache"),
        "fsdp": _config(root / "fsdp.yaml", model_dir, data, root / "fsdp", 2, strategy, {"strategy": "fsdp"},
                        root / "cache"),
    }
    _train(configs["one"])
    _train(configs["fsdp"], "--nproc", "2")
    return {"root": root, "configs": configs, "one": root / "one", "fsdp": root / "fsdp"}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, model_dirs):
    return _runs(tmp_path_factory, model_dirs["llama"], "lora")


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, model_dirs):
    return _runs(tmp_path_factory, model_dirs["llama"], "full")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_fsdp_lora_equals_one_process_and_reloads_with_peft(lora_runs, model_dirs):
    """Loss curve and final adapter of 2 FSDP processes x accumulation 2 equal 1 process x accumulation 4
    within 1e-5; the adapter gathered from the shards loads with plain peft and gives the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, fsdp = lora_runs["one"], lora_runs["fsdp"]
    assert len(_losses(one)) == 4
    assert _losses(fsdp) == pytest.approx(_losses(one), rel=TOLERANCE, abs=TOLERANCE)
    eval_losses = [json.loads((run / "report.json").read_text())["eval_loss"] for run in (one, fsdp)]
    assert eval_losses[1] == pytest.approx(eval_losses[0], rel=TOLERANCE)
    a = load_file(one / "final" / "adapter_model.safetensors")
    b = load_file(fsdp / "final" / "adapter_model.safetensors")
    assert _max_difference(a, b) < TOLERANCE
    assert all(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # trained, not the zero init
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    logits = [_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
                                                run / "final").eval(), ids) for run in (one, fsdp)]
    assert (logits[0] - logits[1]).abs().max() < TOLERANCE


@pytest.mark.slow
def test_fsdp_full_finetune_equals_one_process_and_reloads_with_transformers(full_runs):
    """Full fine-tuning: the same loss curve; the model gathered from the shards is complete (every tensor of
    the one-process model, no DTensor) and its logits, reloaded with plain transformers, match."""
    from transformers import AutoModelForCausalLM

    one, fsdp = full_runs["one"], full_runs["fsdp"]
    assert _losses(fsdp) == pytest.approx(_losses(one), rel=TOLERANCE, abs=TOLERANCE)
    a, b = (load_file(run / "final" / "model.safetensors") for run in (one, fsdp))
    assert _max_difference(a, b) < TOLERANCE
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    logits = [_logits(AutoModelForCausalLM.from_pretrained(run / "final").eval(), ids) for run in (one, fsdp)]
    assert (logits[0] - logits[1]).abs().max() < TOLERANCE


@pytest.mark.slow
def test_sharded_checkpoints_are_complete(lora_runs, full_runs):
    """Each checkpoint of an FSDP run holds one shard per process plus DCP's metadata, every file is in the
    manifest and matches it, and no temporary directory is left behind."""
    for runs in (lora_runs, full_runs):
        checkpoints = runs["fsdp"] / "checkpoints"
        assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-2", "step-4"]
        assert not list(checkpoints.glob(".tmp-*"))
        for path in complete_checkpoints(checkpoints):
            files = json.loads((path / "manifest.json").read_text())["files"]
            assert set(files) == {p.name for p in path.iterdir()} - {"manifest.json"}
            assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "scheduler.json", "rng.pt", "state.json"} == set(files)
            assert verify(path) is None
    damaged = lora_runs["root"] / "damaged"
    shutil.copytree(lora_runs["fsdp"] / "checkpoints" / "step-2", damaged)
    with (damaged / "__1_0.distcp").open("r+b") as fh:  # one process's shard flipped
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    assert verify(damaged) == "__1_0.distcp does not match its checksum"


@pytest.mark.slow
@pytest.mark.parametrize("runs", ["lora_runs", "full_runs"])
def test_fsdp_resume_from_sharded_checkpoint_equals_uninterrupted(runs, request):
    """Resume at step 2 of 4 from the sharded checkpoint: the same later losses and final weights as the run
    that went straight through (bitwise: the shards hold the exact tensors, and the batches replay)."""
    runs = request.getfixturevalue(runs)
    straight, resumed = runs["fsdp"], runs["root"] / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("final", "step-4"))
    config = yaml.safe_load(open(runs["configs"]["fsdp"]))
    config["train"]["output_dir"] = str(resumed)
    (runs["root"] / "resumed.yaml").write_text(yaml.safe_dump(config))
    _train(str(runs["root"] / "resumed.yaml"), "--nproc", "2", "--resume")
    assert _losses(resumed) == _losses(straight)
    name = "adapter_model.safetensors" if (straight / "final" / "adapter_model.safetensors").exists() \
        else "model.safetensors"
    a, b = load_file(straight / "final" / name), load_file(resumed / "final" / name)
    assert _max_difference(a, b) == 0.0
