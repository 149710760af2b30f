"""Checkpoints and resume: a run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from test_train import run_config
from tunesmith.track.metrics import read_metrics
from tunesmith.train.checkpoint import complete_checkpoints, latest_checkpoint

# Runs `tunesmith train` in this process, but SIGKILLs itself at a chosen point of checkpointing:
#   after:N   right after checkpoint step-N is complete
#   during:N  in the middle of writing checkpoint step-N (weights written, no manifest yet)
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import tunesmith.train.checkpoint as ckpt
    import tunesmith.train.loop as loop

    mode, at = sys.argv[1].split(":")
    at = int(at)
    real_save, real_write = ckpt.save_checkpoint, ckpt._write_synced

    def save(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if mode == "after" and step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def write(path, text):
        if mode == "during" and path.parent.name == f".tmp-step-{at}":
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, text)

    loop.save_checkpoint = save
    ckpt._write_synced = write
    from tunesmith.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, model_dirs):
    """An uninterrupted 20-step run; returns (config path, run dir)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_jsonl(root / "chat.jsonl", chat_rows(30, seed=3))
    raw = run_config(model_dirs["llama"], data, root / "straight",
                     strategy={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                     train={"max_steps": 20, "save_every": 5, "micro_batch_size": 3, "grad_accum": 2,
                            "scheduler": "cosine", "warmup_steps": 3})
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    (root / "killer.py").write_text(KILLER)
    result = _cli(["-m", "tunesmith", "train", str(config)], root)
    assert result.returncode == 0, result.stderr
    return config, root / "straight"


def _losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("kill_at", ["after:10", "during:15", "after:5"])
def test_kill_and_resume_is_bitwise_identical(straight, kill_at):
    config, reference = straight
    out = config.parent / f"killed-{kill_at.replace(':', '-')}"
    override = f"train.output_dir={out}"
    killed = _cli([str(config.parent / "killer.py"), kill_at, "train", str(config), override], config.parent)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    mode, step = kill_at.split(":")
    expected_latest = int(step) if mode == "after" else int(step) - 5
    assert latest_checkpoint(out / "checkpoints").name == f"step-{expected_latest}"
    if mode == "during":
        assert (out / "checkpoints" / f".tmp-step-{step}").is_dir(), "the interrupted write left its temp dir"

    resumed = _cli(["-m", "tunesmith", "train", str(config), override, "--resume"], config.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(out) == _losses(reference), "same data order, learning rate and loss at every step"
    final, want = load_file(out / "final" / "adapter_model.safetensors"), load_file(
        reference / "final" / "adapter_model.safetensors")
    assert final.keys() == want.keys()
    for name in want:
        assert final[name].equal(want[name]), name
    assert not list((out / "checkpoints").glob(".tmp-*")), "stale temp dirs are cleaned up"


def test_a_run_dir_with_checkpoints_needs_resume(straight):
    config, reference = straight
    result = _cli(["-m", "tunesmith", "train", str(config)], config.parent)
    assert result.returncode == 2
    assert "--resume" in result.stderr


def test_damaged_checkpoint_is_skipped_for_the_previous_one(straight, tmp_path):
    """A byte changed in the newest checkpoint: its checksum fails, the one before is used."""
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(straight[1] / "checkpoints", root)
    steps = complete_checkpoints(root)
    assert [p.name for p in steps] == ["step-15", "step-20"], "keep_last=2 pruned older checkpoints"
    target = steps[-1] / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert latest_checkpoint(root).name == "step-15"
    (steps[0] / "manifest.json").unlink()
    assert latest_checkpoint(root) is None


def test_checkpoint_manifest_lists_every_file(straight):
    ckpt = latest_checkpoint(straight[1] / "checkpoints")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 20
    assert set(manifest["files"]) == {p.name for p in ckpt.iterdir()} - {"manifest.json"}


def test_resume_on_changed_data_is_refused(straight, tmp_path):
    """Resuming would silently train on other batches: a clear error instead, and nothing written."""
    import shutil

    config, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    other = write_jsonl(tmp_path / "other.jsonl", chat_rows(30, seed=4))
    result = _cli(["-m", "tunesmith", "train", str(config), f"train.output_dir={run}", f"data.train={other}",
                   "--resume"], config.parent)
    assert result.returncode == 2
    assert "training data" in result.stderr and "Traceback" not in result.stderr
    for name in ("metrics.jsonl", "config.yaml"):
        assert (run / name).read_text() == (reference / name).read_text(), name
