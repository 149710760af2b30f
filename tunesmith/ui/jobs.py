"""Commands the studio starts: ordinary `python -m tunesmith ...` processes, recorded next to what they write.

Each job leaves `<run>/ui-jobs/<id>.json` (command line, process id and start time) and `<id>.log` (its terminal
output). The process runs in a session of its own, so it outlives the studio; a restarted studio finds it again
by its record and tells it from a later process with the same id by the process's start time. Stopping sends
SIGTERM to the job's process group: training finishes its step, writes a checkpoint and exits (preempted).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

JOBS_DIR = "ui-jobs"
TAIL_BYTES = 8192


@dataclass
class Job:
    id: str
    command: str  # train, prepare, eval, compare-strategies, estimate, merge or export
    argv: list[str]  # after `python -m tunesmith`
    pid: int
    started: float  # seconds since the epoch
    create_time: float  # the process's start time as the system reports it
    returncode: int | None = None  # set when the studio saw the process end
    stop_requested: float | None = None  # when the studio sent SIGTERM

    def to_json(self) -> dict:
        return asdict(self)


class Jobs:
    """Starts, finds and stops the studio's jobs; `cwd` is where they run (the project root)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self._children: dict[int, subprocess.Popen] = {}  # started by this studio: polled, so they are reaped

    def start(self, command: str, argv: list[str], home: Path) -> Job:
        """Start `python -m tunesmith ARGV` with its output in `home/ui-jobs/`; returns its record."""
        folder = home / JOBS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{secrets.token_hex(2)}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(folder / f"{job_id}.log", "wb") as log:
            child = subprocess.Popen([sys.executable, "-m", "tunesmith", *argv], cwd=self.cwd, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        self._children[child.pid] = child
        job = Job(job_id, command, argv, child.pid, time.time(), _create_time(child.pid))
        write_record(folder / f"{job_id}.json", job)
        return job

    def list(self, home: Path) -> list[Job]:
        """The jobs recorded in `home`, oldest first (unreadable records are left out)."""
        folder = home / JOBS_DIR
        if not folder.is_dir():
            return []
        jobs = [job for path in sorted(folder.glob("*.json")) if (job := read_record(path)) is not None]
        return sorted(jobs, key=lambda j: j.started)

    def alive(self, job: Job, home: Path) -> bool:
        """Whether the job's process still runs; an end seen for the first time is written to its record."""
        child = self._children.get(job.pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return True
            self._children.pop(job.pid, None)
            job.returncode = code
            write_record(home / JOBS_DIR / f"{job.id}.json", job)
            return False
        if job.returncode is not None:
            return False
        try:
            process = psutil.Process(job.pid)
            return abs(process.create_time() - job.create_time) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def stop(self, job: Job, home: Path) -> None:
        """SIGTERM to the job's process group (training checkpoints at the end of its step, then exits)."""
        os.killpg(job.pid, signal.SIGTERM)
        job.stop_requested = time.time()
        write_record(home / JOBS_DIR / f"{job.id}.json", job)

    def close(self) -> None:
        """Forget the children without stopping them: they go on after the studio exits."""
        self._children.clear()


def log_tail(home: Path, job: Job, max_lines: int = 40) -> list[str]:
    """The last lines of the job's terminal output (progress-bar redraws split into lines)."""
    path = home / JOBS_DIR / f"{job.id}.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = [line.rstrip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-max_lines:]


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def write_record(path: Path, job: Job) -> None:
    """The job's record, replaced atomically (a reader never sees half of it)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(job.to_json(), indent=1))
    os.replace(tmp, path)


def read_record(path: Path) -> Job | None:
    """The job of a record file, or None when it cannot be read (damaged, or not a job record)."""
    try:
        raw = json.loads(path.read_text())
        return Job(**{k: raw[k] for k in Job.__dataclass_fields__ if k in raw})
    except (OSError, ValueError, TypeError, KeyError):
        return None
