"""A run directory read as it is: while it is written, after it finished, was stopped, or died half-way.

Nothing here writes. What a run is comes from the files the CLI leaves (DESIGN.md's run directory): config.yaml,
metrics.jsonl, train.log, checkpoints/, final/, report.json, data_report.json, eval/, estimate.json, and the
studio's own job records (ui-jobs/). A file that cannot be read becomes a line in the run's `problems`, never an
error of the page.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tunesmith.train.checkpoint import STEP_DIR, complete_checkpoints
from tunesmith.train.loop import steps_per_epoch
from tunesmith.ui import metrics
from tunesmith.ui.jobs import JOBS_DIR, Jobs, log_tail

MARKERS = ("config.yaml", "metrics.jsonl", JOBS_DIR, "estimate.json", "comparison.json")
NOT_RUNS = {"checkpoints", "final", "data", "eval", JOBS_DIR, "merged", "export"}  # parts of a run, not runs
MAX_DEPTH = 4
RECENT_SECONDS = 120  # a run not started by the studio counts as running while it wrote this recently
STOPPED = re.compile(r"stopped by (\S+) after step (\d+) of (\d+)")
TRAINING = ("train",)


def find_runs(runs: Path) -> list[Path]:
    """Run folders under `runs` (links are not followed; a run's own parts are not searched)."""
    found: list[Path] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        if folder != runs and _is_run(folder, {e.name for e in entries}):
            found.append(folder)
        for entry in entries if depth < MAX_DEPTH else ():
            if entry.is_dir(follow_symlinks=False) and entry.name not in NOT_RUNS and not entry.name.startswith("."):
                visit(Path(entry.path), depth + 1)

    visit(runs, 0)
    return found


def _is_run(folder: Path, names: set[str]) -> bool:
    return bool(names & set(MARKERS)) or (folder / "data" / "data_report.json").is_file() or (
        folder / "eval" / "eval.json").is_file()


class RunReader:
    """Reads one run folder; `problems` collects what could not be read."""

    def __init__(self, path: Path, jobs: Jobs) -> None:
        self.path, self.jobs = path, jobs
        self.problems: list[str] = []
        self.config = self._yaml("config.yaml")
        self.report = self._json("report.json")
        self.metrics = metrics.summary(path / "metrics.jsonl")
        if self.metrics.damaged:
            self.problems.append(f"metrics.jsonl: {self.metrics.damaged} damaged line(s) skipped")
        self.job_list = jobs.list(path)
        self.running = [j for j in self.job_list if jobs.alive(j, path)]

    def _yaml(self, name: str) -> dict:
        return self._parse(name, yaml.safe_load)

    def _json(self, name: str) -> dict:
        return self._parse(name, json.loads)

    def _parse(self, name: str, parse) -> dict:
        path = self.path / name
        if not path.is_file():
            return {}
        try:
            value = parse(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
            self.problems.append(f"{name}: unreadable, damaged or still being written ({type(exc).__name__})")
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{name}: not a mapping (damaged?)")
            return {}
        return value

    def section(self, name: str) -> dict:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}

    def kind(self) -> str:
        """train, prepare, estimate, eval or compare: what the folder holds (or its last job makes)."""
        last = self.job_list[-1].command if self.job_list else None
        if (self.path / "metrics.jsonl").exists() or (self.path / "checkpoints").is_dir() or last == "train":
            return "train"
        for kind, marker in (("compare", "comparison.json"), ("estimate", "estimate.json"),
                             ("prepare", "data/data_report.json"), ("eval", "eval/eval.json")):
            if (self.path / marker).exists():
                return kind
        names = {"compare-strategies": "compare", "prepare": "prepare", "estimate": "estimate", "eval": "eval"}
        return names.get(last, "train")

    # -- status ------------------------------------------------------------------------------------------

    def status(self, kind: str) -> tuple[str, str]:
        """(running | finished | preempted | failed, a short reason)."""
        command = {"compare": "compare-strategies"}.get(kind, kind)
        active = [j for j in self.running if j.command == command]
        if active:
            return "running", f"{command}, process {active[-1].pid}"
        if kind == "train":
            return self._train_status()
        done = {"compare": "comparison.json", "estimate": "estimate.json", "prepare": "data/data_report.json",
                "eval": "eval/eval.json"}[kind]
        if (self.path / done).is_file():
            return "finished", ""
        return "failed", self._failure(command)

    def _train_status(self) -> tuple[str, str]:
        if (self.path / "final").is_dir() and self.report and not self.report.get("preempted"):
            return "finished", ""
        stopped = self._stopped()
        if stopped is not None:
            signal_name, step = stopped
            return "preempted", f"stopped by {signal_name} after step {step}; checkpoint step-{step} written"
        if not any(j.command == "train" for j in self.job_list) and self._seconds_since_write() < RECENT_SECONDS:
            return "running", "not started from the studio: judged by its recent writes"
        return "failed", self._failure("train")

    def _stopped(self) -> tuple[str, int] | None:
        """(signal, step) when the last thing training did was stop cleanly at a checkpoint."""
        matches = STOPPED.findall(_tail_text(self.path / "train.log", 256 * 1024))
        if not matches:
            return None
        signal_name, step = matches[-1][0], int(matches[-1][1])
        last = self.latest_checkpoint_step()
        if last != step or (self.metrics.last_step or 0) > step:
            return None  # resumed since, or killed after more steps
        return signal_name, step

    def _failure(self, command: str) -> str:
        jobs = [j for j in self.job_list if j.command == command]
        if jobs:
            job = jobs[-1]
            errors = [line for line in log_tail(self.path, job, 200) if line.startswith("error:")]
            code = "an unknown code" if job.returncode is None else f"code {job.returncode}"
            return errors[-1] if errors else f"{command} ended with {code} before finishing"
        return "ended without final/ (killed, crashed or still starting)"

    def _seconds_since_write(self) -> float:
        times = [_mtime(self.path / name) for name in ("metrics.jsonl", "train.log")]
        return time.time() - max((t for t in times if t), default=0.0)

    def latest_checkpoint_step(self) -> int | None:
        done = complete_checkpoints(self.path / "checkpoints")
        return int(STEP_DIR.match(done[-1].name).group(1)) if done else None

    # -- progress and time ---------------------------------------------------------------------------------

    def total_steps(self) -> int | None:
        """The optimizer steps this run is set to take (train.max_steps, else epochs over the train split)."""
        train = self.section("train")
        if isinstance(train.get("max_steps"), int):
            return train["max_steps"]
        report = self._data_report()
        split = (report.get("splits") or {}).get("train") or {}
        examples = (split.get("packing") or {}).get("sequences") or split.get("examples")
        try:
            return int(train["epochs"]) * steps_per_epoch(int(examples), int(train["micro_batch_size"]),
                                                          int(train["grad_accum"]))
        except (KeyError, TypeError, ValueError):
            return None

    def times(self, status: str) -> dict[str, float | None]:
        """started and updated (seconds since the epoch) and wall seconds."""
        trains = [j for j in self.job_list if j.command in TRAINING]
        started = trains[0].started if trains else _log_start(self.path / "train.log") or _mtime(
            self.path / "config.yaml")
        updated = max((t for name in ("metrics.jsonl", "train.log", "report.json", JOBS_DIR)
                       if (t := _mtime(self.path / name))), default=None)
        if status == "finished" and isinstance(self.report.get("seconds"), (int, float)):
            wall = float(self.report["seconds"])
        elif started is not None:
            wall = (time.time() if status == "running" else (updated or started)) - started
        else:
            wall = None
        return {"started": started, "updated": updated, "wall_seconds": wall}

    def _data_report(self) -> dict:
        for name in ("data_report.json", "data/data_report.json"):
            report = self._json(name)
            if report:
                return report
        return {}

    # -- what the page shows ---------------------------------------------------------------------------------

    def summary(self, run_id: str) -> dict[str, Any]:
        """One row of the runs table."""
        kind = self.kind()
        status, reason = self.status(kind)
        model = self.section("model")
        latest = self.latest_checkpoint_step()
        return {
            "id": run_id, "kind": kind, "status": status, "reason": reason,
            "activity": [j.command for j in self.running],
            "objective": self.section("train").get("objective"), "strategy": self.section("strategy").get("name"),
            "model": model.get("name_or_path") or ("model.init" if model.get("init") else None),
            "step": self.metrics.last_step, "total_steps": self._reported_total(status),
            **self.metrics.losses(), **self.times(status),
            "has_final": (self.path / "final").is_dir(), "latest_checkpoint": latest,
            "stoppable": any(j.command in TRAINING + ("prepare", "eval", "compare-strategies", "estimate")
                             for j in self.running),
            "resumable": status in ("preempted", "failed") and latest is not None and bool(self.config),
            "problems": self.problems,
        }

    def _reported_total(self, status: str) -> int | None:
        if status == "finished" and isinstance(self.report.get("steps"), int):
            return self.report["steps"]
        return self.total_steps()

    def detail(self, run_id: str) -> dict[str, Any]:
        """Everything the run page shows besides its curves."""
        summary = self.summary(run_id)
        return {
            **summary,
            "config_text": _text(self.path / "config.yaml"),
            "report_md": _text(self.path / "report.md"),
            "data_report": self._data_report(),
            "eval_md": _text(self.path / "eval" / "eval.md"),
            "estimate": self._json("estimate.json"),
            "comparison_md": _text(self.path / "comparison.md"),
            "checkpoints": checkpoints(self.path / "checkpoints"),
            "prepared": [s for s in ("train", "validation", "test") if (self.path / "data" / s).is_dir()],
            "jobs": [{**j.to_json(), "alive": j in self.running, "log": log_tail(self.path, j)}
                     for j in self.job_list[-10:]],
            "problems": self.problems,
        }


def checkpoints(root: Path) -> list[dict[str, Any]]:
    """Each checkpoint folder: step, complete (its manifest is written) or still being written, size."""
    if not root.is_dir():
        return []
    complete = {p.name for p in complete_checkpoints(root)}
    rows = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name.removeprefix(".tmp-"))
        if match and path.is_dir():
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            rows.append({"name": path.name, "step": int(match.group(1)), "complete": path.name in complete,
                         "bytes": size})
    return sorted(rows, key=lambda r: r["step"])


def _text(path: Path, limit: int = 256 * 1024) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def _tail_text(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - size))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _log_start(path: Path) -> float | None:
    """The time of train.log's first record (its format: `2026-01-31 12:00:00,123 LEVEL name: message`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        return datetime.strptime(first[:19], "%Y-%m-%d %H:%M:%S").timestamp()
    except (OSError, ValueError):
        return None


def list_runs(runs: Path, jobs: Jobs) -> list[dict[str, Any]]:
    """A summary of every run under `runs`; a run that cannot be read at all is listed with its problem."""
    rows = []
    for path in find_runs(runs):
        run_id = path.relative_to(runs).as_posix()
        try:
            rows.append(RunReader(path, jobs).summary(run_id))
        except Exception as exc:  # noqa: BLE001 - one damaged run never breaks the page
            rows.append({"id": run_id, "kind": "?", "status": "failed", "reason": "unreadable run folder",
                         "problems": [f"{type(exc).__name__}: {exc}"]})
    return rows
