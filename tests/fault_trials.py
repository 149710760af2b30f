"""Fault trials for tests/test_faults.py: runs `tunesmith train` in forked children and breaks them on purpose.

    python fault_trials.py CONFIG OUT_ROOT TRIALS_JSON RESULTS_JSON

The parent imports tunesmith, torch and transformers once and never trains; every run is a fork of it, so a
trial costs its training time, not a fresh interpreter's imports (torch must not have run before a fork, so
the parent only imports). Each trial is {"name", "fault"} and runs in OUT_ROOT/NAME:

1. the broken run: `tunesmith train CONFIG train.output_dir=OUT_ROOT/NAME` with the fault armed;
2. optionally damage (`"damage": [step, file]`: truncate that file of checkpoint step-N);
3. the resumed run: `--resume` if a complete checkpoint exists, else the same command again (a run killed before
   its first checkpoint starts over).

Faults ("N" is an optimizer step, counted from 1):
    reference             no fault (the uninterrupted run the others are compared with)
    mid:N                 SIGKILL inside step N's first forward pass
    step:N                SIGKILL right after step N's optimizer step (before its logging and checkpoint)
    saved:N               SIGKILL right after checkpoint step-N is complete
    save:N:trainable      SIGKILL halfway through writing checkpoint N's trainable.safetensors
    save:N:optimizer      SIGKILL halfway through writing checkpoint N's optimizer.pt
    save:N:manifest       SIGKILL halfway through writing checkpoint N's manifest (a torn manifest)
    save:N:rename         SIGKILL with checkpoint N complete in its temp dir, just before the rename
    save:N:prune          SIGKILL after checkpoint N, while pruning (an old checkpoint half deleted)
    final                 SIGKILL with final/ written to final.tmp, just before its rename
    signal:N:NAME         SIGTERM or SIGINT sent to itself inside step N's forward pass (preemption)
    external:N            the parent sends SIGTERM once metrics.jsonl holds N records
    fsize:N:BYTES         a file size limit of BYTES set just before checkpoint N is written (a full disk)

Results: {name: {"broken": exit code (negative: killed by that signal), "resumed": exit code or null,
"resumed_with": "--resume" | "restart" | null, "seconds": wall time}}. Each run's stdout+stderr is in
OUT_ROOT/NAME/{broken,resumed}.out.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import datasets  # noqa: F401  (imported here so that no child pays for them)
import matplotlib.pyplot  # noqa: F401
import peft  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

import tunesmith.cli
import tunesmith.data.build  # noqa: F401
import tunesmith.data.cache
import tunesmith.train.checkpoint as ckpt
import tunesmith.train.loop as loop
import tunesmith.train.run  # noqa: F401

# The data fingerprint covers tunesmith's data code as it is on disk; digest it once here, so that an edit to
# that code while the trials run (a shared checkout) cannot make a resumed run refuse its own checkpoints.
tunesmith.data.cache._code_digest()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half_then_die(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    die()


def _wrap_train_step(before=None, after=None) -> None:
    """Call before(step, args) -> args and after(step) around every optimizer step."""
    real = loop.train_step
    signature = inspect.signature(real)

    def train_step(*args, **kwargs):
        step = signature.bind(*args, **kwargs).arguments["step"]
        if before is not None:
            args = before(step, args)
        out = real(*args, **kwargs)
        if after is not None:
            after(step)
        return out

    loop.train_step = train_step


def _on_first_loss(step_wanted: int, action) -> None:
    """Run `action()` once, inside the first forward pass of step `step_wanted`."""

    def before(step, args):
        if step != step_wanted:
            return args
        objective, pending = args[1], [action]

        def loss(model, batch):
            while pending:
                pending.pop()()
            return objective.loss(model, batch)

        return (args[0], dataclasses.replace(objective, loss=loss), *args[2:])

    _wrap_train_step(before=before)


def arm(fault: str) -> None:
    kind, *rest = fault.split(":")
    if kind == "reference" or kind == "external":
        return
    if kind == "mid":
        _on_first_loss(int(rest[0]), die)
    elif kind == "step":
        at = int(rest[0])
        _wrap_train_step(after=lambda step: die() if step == at else None)
    elif kind == "signal":
        sig = getattr(signal, rest[1])
        _on_first_loss(int(rest[0]), lambda: os.kill(os.getpid(), sig))
    elif kind == "saved":
        at, real = int(rest[0]), loop.save_checkpoint

        def save(root, step, *args, **kwargs):
            path = real(root, step, *args, **kwargs)
            if step == at:
                die()
            return path

        loop.save_checkpoint = save
    elif kind == "fsize":
        at, limit, real = int(rest[0]), int(rest[1]), loop.save_checkpoint

        def save(root, step, *args, **kwargs):
            if step == at:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            return real(root, step, *args, **kwargs)

        loop.save_checkpoint = save
    elif kind == "save":
        _arm_save(int(rest[0]), rest[1])
    elif kind == "final":
        real_rename = os.rename

        def rename(src, dst):
            if Path(dst).name == "final":
                die()
            real_rename(src, dst)

        os.rename = rename
    else:
        raise ValueError(f"unknown fault {fault!r}")


def _arm_save(at: int, stage: str) -> None:
    """SIGKILL at `stage` of writing checkpoint `at`."""
    in_tmp = lambda path: Path(path).parent.name == f".tmp-step-{at}"  # noqa: E731
    if stage == "trainable":
        real = ckpt.save_file

        def save_file(tensors, path, *args, **kwargs):
            real(tensors, path, *args, **kwargs)
            if in_tmp(path):
                _write_half_then_die(Path(path))

        ckpt.save_file = save_file
    elif stage == "optimizer":
        real = ckpt._torch_save

        def torch_save(obj, path):
            real(obj, path)
            if in_tmp(path) and Path(path).name == "optimizer.pt":
                _write_half_then_die(Path(path))

        ckpt._torch_save = torch_save
    elif stage == "manifest":
        real = ckpt._write_synced

        def write_synced(path, text):
            if in_tmp(path):
                Path(path).write_text(text[: len(text) // 2])
                die()
            real(path, text)

        ckpt._write_synced = write_synced
    elif stage == "rename":
        real_rename = os.rename

        def rename(src, dst):
            if Path(dst).name == f"step-{at}":
                die()
            real_rename(src, dst)

        os.rename = rename
    elif stage == "prune":
        real_prune = ckpt.prune
        state = {"saving": False}
        real_save = loop.save_checkpoint

        def save(root, step, *args, **kwargs):
            state["saving"] = step == at
            return real_save(root, step, *args, **kwargs)

        def prune(root, keep_last, keep=()):
            old = ckpt.complete_checkpoints(root)[:-keep_last]
            if state["saving"] and old:  # delete part of the oldest one, as an interrupted rmtree would
                (old[0] / "trainable.safetensors").unlink()
                die()
            real_prune(root, keep_last, keep)

        loop.save_checkpoint = save
        ckpt.prune = prune
    else:
        raise ValueError(f"unknown checkpoint stage {stage!r}")


def run_child(argv: list[str], fault: str, out: Path, watch: tuple[Path, int] | None = None) -> int:
    """Run `tunesmith ARGV` in a fork with `fault` armed; its exit code, negative when a signal ended it.
    With `watch` = (metrics file, n), SIGTERM is sent once that file holds n records."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            arm(fault)
            code = tunesmith.cli.main(argv)
        except BaseException:  # noqa: BLE001 - reported through the exit code and the output file
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = _signal_when(pid, *watch) if watch is not None else None
    if status is None:
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _signal_when(pid: int, metrics: Path, records: int) -> int | None:
    """SIGTERM to `pid` once `metrics` holds `records` records; the wait status if it ended before that."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if line) >= records:
            os.kill(pid, signal.SIGTERM)
            return None
        time.sleep(0.05)


def main(config: str, out_root: str, trials_json: str, results_json: str) -> None:
    results = {}
    for trial in json.loads(Path(trials_json).read_text()):
        name, fault = trial["name"], trial["fault"]
        run_dir = Path(out_root) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = ["train", config, f"train.output_dir={run_dir}"]
        started = time.perf_counter()
        watch = (run_dir / "metrics.jsonl", int(fault.split(":")[1])) if fault.startswith("external:") else None
        broken = run_child(argv, fault, run_dir / "broken.out", watch)
        result = {"broken": broken, "resumed": None, "resumed_with": None}
        if fault != "reference":
            if "damage" in trial:
                step, name_ = trial["damage"]
                target = run_dir / "checkpoints" / f"step-{step}" / name_
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            resumable = ckpt.latest_checkpoint(run_dir / "checkpoints", []) is not None
            result["resumed_with"] = "--resume" if resumable else "restart"
            result["resumed"] = run_child(argv + (["--resume"] if resumable else []), "reference",
                                          run_dir / "resumed.out")
        result["seconds"] = round(time.perf_counter() - started, 2)
        results[name] = result
        Path(results_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
