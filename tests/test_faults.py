"""Fault tolerance: a run that is killed, preempted, runs out of disk, finds a damaged checkpoint or meets a NaN
ends with the same weights as a run that met none of it, or stops with a clear error and its checkpoints intact.

The killed runs are forks of one driver process (tests/fault_trials.py), so each trial costs its training time,
not an interpreter start. Every trial is compared with an uninterrupted reference run: losses, learning rates
and final adapter weights must be bitwise equal (CPU, one thread).
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from test_train import run_config
from tunesmith.cli import main
from tunesmith.config import config_from_dict
from tunesmith.data.batching import collate
from tunesmith.data.formats import load_rows
from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import tokenize_rows
from tunesmith.errors import TunesmithError
from tunesmith.model.strategies import apply_strategy
from tunesmith.objectives import build_objective
from tunesmith.track.metrics import read_metrics
import tunesmith.train.checkpoint as ckpt
import tunesmith.train.run as run_module
from tunesmith.model.trainable import verify
from tunesmith.train.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from tunesmith.train.loop import NonFiniteError, train_step
from tunesmith.train.run import train

TESTS = Path(__file__).parent
STEPS, SAVE_EVERY = 12, 3  # checkpoints at 3, 6, 9, 12 (keep_last=2)


def run_trials(config: Path, root: Path, trials: list[dict]) -> dict:
    """Run `trials` through tests/fault_trials.py (one process, a fork per run); returns its results."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "trials.json").write_text(json.dumps(trials))
    # One thread: torch's thread pool only slows tiny models down on a shared 2-core machine, and every run
    # (reference included) must use the same count for bitwise equality.
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(TESTS / "fault_trials.py"), str(config), str(root),
                             str(root / "trials.json"), str(root / "results.json")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def config(tmp_path_factory, model_dirs) -> Path:
    """12 steps over 30 conversations (2.4 epochs), accumulation 2, LoRA dropout (so the RNG state matters), a
    cosine schedule with warmup, a checkpoint every 3 steps."""
    root = tmp_path_factory.mktemp("faults")
    data = write_jsonl(root / "chat.jsonl", chat_rows(30, seed=3))
    raw = run_config(model_dirs["llama"], data, root / "unused",
                     strategy={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                     train={"max_steps": STEPS, "save_every": SAVE_EVERY, "micro_batch_size": 3, "grad_accum": 2,
                            "scheduler": "cosine", "warmup_steps": 2},
                     tracking={"progress_bar": False, "log_level": "info"})
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


FAST_TRIALS = [
    {"name": "reference", "fault": "reference"},
    {"name": "kill-mid-step", "fault": "mid:5"},
    {"name": "kill-writing-optimizer", "fault": "save:6:optimizer"},
    {"name": "sigterm", "fault": "signal:8:SIGTERM"},
    {"name": "full-disk", "fault": "fsize:9:20000"},
    {"name": "damaged", "fault": "saved:9", "damage": [9, "trainable.safetensors"]},
]


@pytest.fixture(scope="module")
def trials(config) -> tuple[Path, dict]:
    root = config.parent / "trials"
    return root, run_trials(config, root, FAST_TRIALS)


def _losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def assert_recovered(run: Path, reference: Path) -> None:
    """The finished run equals the reference: same loss and learning rate at every step, bitwise equal adapter,
    no temporary checkpoint directories left."""
    assert _losses(run) == _losses(reference), "same data order, learning rate and loss at every step"
    assert len(_losses(run)) == STEPS
    final = load_file(run / "final" / "adapter_model.safetensors")
    want = load_file(reference / "final" / "adapter_model.safetensors")
    assert final.keys() == want.keys()
    for name in want:
        assert final[name].equal(want[name]), name
    assert not list((run / "checkpoints").glob(".tmp-*")), "temporary checkpoint directories are cleaned up"


def test_reference_run_is_complete(trials):
    root, results = trials
    assert results["reference"]["broken"] == 0
    assert [p.name for p in sorted((root / "reference" / "checkpoints").iterdir())] == ["step-12", "step-9"]


@pytest.mark.parametrize("name", ["kill-mid-step", "kill-writing-optimizer"])
def test_sigkill_then_resume_is_bitwise_identical(trials, name):
    """SIGKILL inside a forward pass, or halfway through writing a checkpoint file: resuming from the newest
    complete checkpoint ends exactly where an uninterrupted run ends."""
    root, results = trials
    assert results[name]["broken"] == -signal.SIGKILL
    assert (results[name]["resumed"], results[name]["resumed_with"]) == (0, "--resume")
    assert_recovered(root / name, root / "reference")


def test_sigterm_saves_at_the_step_boundary_and_exits_0(trials):
    """SIGTERM during step 8's forward pass: the step finishes, checkpoint step-8 is written (not a regular
    checkpoint step), the command exits 0 without final/; --resume then ends bitwise equal."""
    root, results = trials
    run = root / "sigterm"
    assert results["sigterm"]["broken"] == 0
    out = (run / "broken.out").read_text()
    assert "received SIGTERM" in out and "checkpoint" in out and "--resume" in out
    assert "Traceback" not in out and "error:" not in out
    log_text = (run / "train.log").read_text()
    assert f"stopped by SIGTERM after step 8 of {STEPS}" in log_text
    assert f"resumed from {run / 'checkpoints' / 'step-8'} (step 8 of {STEPS})" in log_text
    assert results["sigterm"]["resumed"] == 0
    assert_recovered(run, root / "reference")


def test_full_disk_gives_one_clear_error_and_keeps_the_previous_checkpoint(trials):
    """A file size limit hit while writing checkpoint step-9 (what a full disk does to a write): exit 2, one
    `error:` line naming the checkpoint, the file and the reason; step-6 stays the latest and intact, the
    partial step-9 is removed; --resume from step-6 then ends bitwise equal."""
    root, results = trials
    run = root / "full-disk"
    assert results["full-disk"]["broken"] == 2
    errors = [line for line in (run / "broken.out").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    error = errors[0]
    assert f"could not write checkpoint {run / 'checkpoints' / 'step-9'}" in error
    assert "trainable.safetensors" in error and "File too large" in error
    assert f"previous checkpoint {run / 'checkpoints' / 'step-6'} is intact" in error
    assert "Traceback" not in (run / "broken.out").read_text()
    assert f"resumed from {run / 'checkpoints' / 'step-6'} (step 6 of {STEPS})" in (run / "train.log").read_text()
    assert_recovered(run, root / "reference")


def test_damaged_newest_checkpoint_is_skipped_with_a_clear_message(trials):
    """Killed after checkpoint step-9, whose weights file is then truncated: the resume names the damaged
    checkpoint and the problem, resumes from step-6, and still ends bitwise equal."""
    root, results = trials
    run = root / "damaged"
    assert results["damaged"]["broken"] == -signal.SIGKILL
    step9 = run / "checkpoints" / "step-9"
    warning = f"skipping damaged checkpoint {step9}: trainable.safetensors does not match its checksum"
    assert warning in (run / "resumed.out").read_text()
    log_text = (run / "train.log").read_text()
    assert warning in log_text
    assert f"resumed from {run / 'checkpoints' / 'step-6'} (step 6 of {STEPS})" in log_text
    assert_recovered(run, root / "reference")


# ------------------------------------------------------------------ 10 random kill points (slow)

STEP_POINTS = [f"mid:{k}" for k in range(1, STEPS + 1)] + [f"step:{k}" for k in range(1, STEPS)] + \
    [f"saved:{k}" for k in range(SAVE_EVERY, STEPS, SAVE_EVERY)]
WRITE_POINTS = [f"save:{k}:{stage}" for k in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)
                for stage in ("trainable", "optimizer", "manifest", "rename")] + \
    [f"save:{k}:prune" for k in (9, 12)] + ["final"]  # pruning starts at step 9 (keep_last=2)
KILL_SEED = 20261121


def kill_points(seed: int = KILL_SEED) -> list[str]:
    """10 kill points: 5 during training steps, 5 while a checkpoint or final/ is being written."""
    rng = random.Random(seed)
    return rng.sample(STEP_POINTS, 5) + rng.sample(WRITE_POINTS, 5)


@pytest.mark.slow
def test_ten_random_sigkills_and_other_interruptions_all_recover(trials, config):
    """SIGKILL at 10 seeded random points (5 inside training steps, 5 during checkpoint or final/ writes), plus
    SIGINT in a step and a SIGTERM sent from outside: every run, resumed (or restarted when killed before its
    first checkpoint), ends bitwise equal to the uninterrupted reference.

    TUNESMITH_FAULT_POINTS=all runs every one of the 45 kill points instead (about 4 minutes of CPU)."""
    reference_root, _ = trials
    points = STEP_POINTS + WRITE_POINTS if os.environ.get("TUNESMITH_FAULT_POINTS") == "all" else kill_points()
    extra = [{"name": "sigint", "fault": "signal:4:SIGINT"}, {"name": "external-sigterm", "fault": "external:7"}]
    runs = [{"name": f"kill-{i}-{p.replace(':', '-')}", "fault": p} for i, p in enumerate(points)] + extra
    root = config.parent / "random-trials"
    results = run_trials(config, root, runs)
    for trial in runs:
        name, result = trial["name"], results[trial["name"]]
        expected = 0 if trial in extra else -signal.SIGKILL
        assert result["broken"] == expected, (name, result, (root / name / "broken.out").read_text()[-2000:])
        assert result["resumed"] == 0, (name, (root / name / "resumed.out").read_text()[-2000:])
        assert_recovered(root / name, reference_root / "reference")
    (root / "summary.json").write_text(json.dumps({"points": points, "results": results}, indent=1))


def test_kill_points_are_seeded_and_half_of_them_hit_a_write():
    assert kill_points() == kill_points()
    assert sum(p.startswith(("save:", "final")) for p in kill_points()) == 5
    assert len(set(kill_points())) == 10


# ------------------------------------------------------------------ checkpoint damage and write failures


def _tiny_checkpoints(root: Path, steps=(1, 2)) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in steps:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        save_checkpoint(root, step, model, optimizer, scheduler, {"note": "x"}, keep_last=5)
    return model, optimizer, scheduler


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "byte-flipped": lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 0x01]) + p.read_bytes()[1:]),
    "emptied": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
}
FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.json", "rng.pt", "state.json")


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("name", FILES)
def test_any_damaged_file_makes_the_checkpoint_skipped(tmp_path, caplog, name, damage):
    """Every file of the newest checkpoint, truncated, altered by one bit, emptied or deleted: the checksums in
    the manifest catch it, and the previous checkpoint is returned with a warning naming path and problem."""
    _tiny_checkpoints(tmp_path)
    DAMAGES[damage](tmp_path / "step-2" / name)
    with caplog.at_level(logging.WARNING, logger="tunesmith.train.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    problem = f"{name} is missing" if damage == "deleted" else f"{name} does not match its checksum"
    assert f"skipping damaged checkpoint {tmp_path / 'step-2'}: {problem}" in caplog.text


@pytest.mark.parametrize("manifest, problem", [
    ("", "unreadable manifest"), ("{", "unreadable manifest"), ('{"step": 2}', "unreadable manifest"),
    ("[1, 2]", "unreadable manifest"), ('{"files": {"../step-1/rng.pt": "0"}}', "unreadable manifest"),
    ('{"files": "x"}', "unreadable manifest"), ("torn", "the manifest does not list optimizer.pt"),
])
def test_a_torn_or_wrong_manifest_makes_the_checkpoint_skipped(tmp_path, caplog, manifest, problem):
    """A manifest cut short, of the wrong shape, naming a file outside the checkpoint, or not listing every file
    the checkpoint needs ("torn": its optimizer.pt entry removed)."""
    _tiny_checkpoints(tmp_path)
    path = tmp_path / "step-2" / "manifest.json"
    if manifest == "torn":
        data = json.loads(path.read_text())
        del data["files"]["optimizer.pt"]
        manifest = json.dumps(data)
    path.write_text(manifest)
    with caplog.at_level(logging.WARNING, logger="tunesmith.train.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    assert f"skipping damaged checkpoint {tmp_path / 'step-2'}: {problem}" in caplog.text


@pytest.mark.parametrize("failing", FILES + ("manifest.json",))
def test_disk_full_while_saving_raises_a_clear_error_and_changes_nothing(tmp_path, monkeypatch, failing):
    """ENOSPC on any file of checkpoint step-3: CheckpointError (a TunesmithError) naming the checkpoint, the file
    and the reason; the temporary directory is gone, step-1 and step-2 are untouched and step-2 stays the latest."""
    model, optimizer, scheduler = _tiny_checkpoints(tmp_path)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    real_torch_save, real_save_file, real_synced = ckpt._torch_save, ckpt.save_file, ckpt._write_synced
    real_write_text = Path.write_text

    def full(path):
        if Path(path).name == failing and Path(path).parent.name == ".tmp-step-3":
            Path(path).write_bytes(b"partial")  # what a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "_torch_save", lambda obj, path: (full(path), real_torch_save(obj, path)))
    monkeypatch.setattr(ckpt, "save_file", lambda t, path: (full(path), real_save_file(t, path)))
    monkeypatch.setattr(ckpt, "_write_synced", lambda path, text: (full(path), real_synced(path, text)))
    monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: (full(self), real_write_text(self, text,
                                                                                                      *a, **k))[1])
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {}, keep_last=1)
    message = str(caught.value)
    assert isinstance(caught.value, TunesmithError)
    assert message.startswith(f"could not write checkpoint {tmp_path / 'step-3'}: writing {failing} failed: "
                              "No space left on device (ENOSPC)")
    assert f"the previous checkpoint {tmp_path / 'step-2'} is intact" in message
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before, \
        "nothing pruned, nothing left behind"
    assert latest_checkpoint(tmp_path) == tmp_path / "step-2" and verify(tmp_path / "step-2") is None


# ------------------------------------------------------------------ non-finite loss or gradient


def _nan_at(step_wanted: int, monkeypatch) -> None:
    """Make the objective's loss NaN in every micro-batch of optimizer step `step_wanted` (a poisoned batch)."""
    real_build = run_module.build_objective
    current = {"step": None}

    def build_objective(*args, **kwargs):
        objective = real_build(*args, **kwargs)
        assert objective.prepare is None, "the test wraps prepare to learn the step"

        def prepare(model, batches, accelerator, step):
            current["step"] = step

        def loss(model, batch):
            out = objective.loss(model, batch)
            if current["step"] == step_wanted:
                out = dataclasses.replace(out, loss_sum=out.loss_sum * float("nan"))
            return out

        return dataclasses.replace(objective, loss=loss, prepare=prepare)

    monkeypatch.setattr(run_module, "build_objective", build_objective)


@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("nan") / "chat.jsonl", chat_rows(16, seed=5))


def _nan_config(model_dirs, data, out, policy, **train_keys):
    return run_config(model_dirs["llama"], data, out, strategy={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                      train={"max_steps": 6, "save_every": 1, "keep_last": 10, "micro_batch_size": 2,
                             "grad_accum": 2, "on_nonfinite": policy, **train_keys})


@pytest.fixture(scope="module")
def skipped_run(model_dirs, nan_data, tmp_path_factory):
    """6 steps with a NaN loss in step 3 and on_nonfinite=skip (a checkpoint after every step)."""
    monkeypatch = pytest.MonkeyPatch()
    _nan_at(3, monkeypatch)
    out = tmp_path_factory.mktemp("skip") / "run"
    cfg = _nan_config(model_dirs, nan_data, out, "skip")
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        report = train(config_from_dict(cfg))
    finally:
        monkeypatch.undo()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers, \
        "fit restores the signal handlers it replaced"
    return cfg, out, report


def test_nonfinite_step_is_skipped_counted_and_changes_nothing(skipped_run):
    """The NaN step changes no weight and no optimizer state (Adam's moments and step count); the learning-rate
    schedule still advances; metrics.jsonl and the report count the skipped step; the other steps train."""
    cfg, out, report = skipped_run
    assert report["nonfinite_steps"] == [3]
    assert "Skipped 1 step(s) with a non-finite loss or gradient" in (out / "report.md").read_text()
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" not in r}
    assert records[3]["nonfinite_steps"] == 1 and "loss" not in records[3] and "grad_norm" not in records[3]
    assert all(math.isfinite(records[k]["loss"]) and "nonfinite_steps" not in records[k] for k in (1, 2, 4, 5, 6))
    ckpts = out / "checkpoints"
    weights = {k: load_file(ckpts / f"step-{k}" / "trainable.safetensors") for k in (2, 3, 4)}
    assert all(weights[3][n].equal(weights[2][n]) for n in weights[2]), "step 3 changed no weight"
    assert any(not weights[4][n].equal(weights[3][n]) for n in weights[3]), "step 4 trained"
    optim = {k: torch.load(ckpts / f"step-{k}" / "optimizer.pt", weights_only=True) for k in (2, 3)}
    for key, state in optim[2]["state"].items():
        assert float(optim[3]["state"][key]["step"]) == float(state["step"]) == 2.0
        assert optim[3]["state"][key]["exp_avg"].equal(state["exp_avg"])
    schedule = [json.loads((ckpts / f"step-{k}" / "scheduler.json").read_text())["last_epoch"] for k in (2, 3, 4)]
    assert schedule == [2, 3, 4], "the schedule follows the step number"
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert len(lrs) == 6
    assert json.loads((ckpts / "step-4" / "state.json").read_text())["nonfinite_steps"] == [3]
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.mark.parametrize("resume_from", [2, 4])
def test_resume_around_a_skipped_step_is_bitwise_identical(skipped_run, model_dirs, monkeypatch, tmp_path,
                                                           resume_from):
    """Resuming before the skipped step replays the skip; resuming after it keeps its count: either way the
    final weights and the report's skipped steps equal the uninterrupted run's."""
    cfg, out, report = skipped_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "final")
    for path in (run / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > resume_from:
            shutil.rmtree(path)
    _nan_at(3, monkeypatch)
    resumed = train(config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(run), "resume": True}}))
    assert resumed["nonfinite_steps"] == [3]
    final, want = (load_file(d / "final" / "adapter_model.safetensors") for d in (run, out))
    assert all(final[n].equal(want[n]) for n in want)
    assert _losses(run) == _losses(out)


def test_nonfinite_stop_ends_with_one_error_and_keeps_the_good_checkpoints(model_dirs, nan_data, tmp_path,
                                                                          monkeypatch, capsys):
    """on_nonfinite=stop with a NaN in step 5 (checkpoints every 2 steps): exit 2 with one `error:` line naming
    the step, the policy and the last good checkpoint (step-4, intact, finite); no step-5 and no final/."""
    _nan_at(5, monkeypatch)
    out = tmp_path / "run"
    cfg = _nan_config(model_dirs, nan_data, out, "stop", save_every=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "step 5: non-finite loss" in errors[0] and "train.on_nonfinite=stop" in errors[0]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-4'}" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-4"
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / "step-4" /
                                                          "trainable.safetensors").values())
    assert not (out / "final").exists()
    assert issubclass(NonFiniteError, TunesmithError)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the skipped first step
def test_an_infinite_gradient_is_never_applied(model_dirs, tokenizer, tmp_path):
    """A finite loss whose gradient is infinite (a hook scales one gradient by inf): train_step reports it and
    leaves every parameter and the optimizer state as they were; the schedule advances; the next step trains."""
    from transformers import AutoModelForCausalLM

    tok = copy.deepcopy(tokenizer)
    install_template(tok, "chatml")
    examples, _ = tokenize_rows(tok, load_rows(write_jsonl(tmp_path / "c.jsonl", chat_rows(4)))[:4], 256)
    torch.manual_seed(0)
    model = apply_strategy(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), "lora", lora_r=4,
                           lora_dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    batches = [collate(examples, tok.pad_token_id)]
    before = [p.detach().clone() for p in params]
    hook = params[0].register_hook(lambda grad: grad * float("inf"))
    stats = train_step(model, build_objective("sft"), optimizer, scheduler, Accelerator(cpu=True), batches, 1.0, 1)
    hook.remove()
    assert stats["nonfinite"] and math.isfinite(stats["loss_sum"]) and not math.isfinite(stats["grad_norm"])
    assert all(p.equal(b) for p, b in zip(params, before))
    assert optimizer.state_dict()["state"] == {}, "Adam never stepped"
    assert all(p.grad is None for p in params)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 2), "the schedule advanced"
    stats = train_step(model, build_objective("sft"), optimizer, scheduler, Accelerator(cpu=True), batches, 1.0, 2)
    assert not stats["nonfinite"] and any(not p.equal(b) for p, b in zip(params, before))
