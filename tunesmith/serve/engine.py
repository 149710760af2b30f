"""The engine: one thread that owns the model and decodes the queued requests with continuous batching.

Requests wait in one first-in-first-out queue of at most `max_queue` generations; a request that does not fit is
refused at once (QueueFull), never left waiting. Up to `max_batch_size` generations run at once. Each round the
engine takes the oldest waiting generations into the free places (whatever their adapter), prefills them, then
decodes one token for every running generation: a request that arrives while others run joins them at the next
step, and a finished one leaves at once (its place goes to the next in the queue). See
`tunesmith.model.decode` for how rows of different lengths share a step and compute what each would alone.

Adapters: rows of one forward pass must share an adapter, so the running generations form one group per adapter
(the base alone is one more), each a `Batch` with its own KV cache. A round steps every group once, switching
the PEFT adapter before each; no group waits for another to drain, and the queue stays first come, first served.

Events go back to the request through its `on_event` callback, from the engine thread:
    ("token", token_id, finish_reason or None)     finish_reason: "stop" (a stop token) or "length"
    ("error", message, cause)                       the request is over; cause: "failed" (its group's forward
                                                    pass raised) or "stopped" (the engine shut down first)

Shutting down: `stop()` refuses new work (EngineStopped) and ends every queued generation with a "stopped" error
at once; the running generations go on. `close(grace)` stops, gives them `grace` seconds, then ends them too and
joins the thread.

Counters (`stats`): a "batch" is a set of generations that joined together (one prefill pass; `batch_rows` sums
their sizes); `steps` counts decode passes and `step_rows` the generations they carried (their ratio is the mean
running batch); `decode_seconds` is time in forward passes, `prefill_seconds` the part of it spent prefilling;
`job_seconds` sums each finished generation's time from joining to leaving.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tunesmith.model.decode import Batch, Event, Row, Sampling

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One generation (one choice of one HTTP request)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    adapter: str | None  # the adapter's name inside the PeftModel, or None for the base alone
    on_event: Callable[[tuple], None]
    row: Row | None = field(default=None, repr=False)
    cancelled: bool = False
    joined: float = field(default=0.0, repr=False)  # perf_counter() when it joined the running batch

    def cancel(self) -> None:
        self.cancelled = True
        if self.row is not None:
            self.row.cancelled = True


class QueueFull(Exception):
    """The queue cannot take the generations of a request now."""


class EngineStopped(Exception):
    """The engine takes no more work: the server is shutting down."""


class Engine:
    def __init__(self, model, stop_ids: list[int], pad_id: int, max_batch_size: int = 8, max_queue: int = 256):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._groups: dict[str | None, Batch] = {}  # adapter -> its running rows
        self._jobs: dict[int, Job] = {}  # id(job.row) -> job, for the running ones
        self._active: str | None = None  # the adapter last set active
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self.stats = {"jobs_started": 0, "jobs_finished": 0, "batches": 0, "batch_rows": 0, "steps": 0,
                      "step_rows": 0, "tokens_generated": 0, "decode_seconds": 0.0, "prefill_seconds": 0.0,
                      "job_seconds": 0.0, "running": 0, "errors": 0}

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` (one request's generations) or none.

        Raises:
            EngineStopped: after `stop()`.
            QueueFull: the waiting generations and `jobs` together would be more than `max_queue`.
        """
        with self._ready:
            if self._closed:
                raise EngineStopped("the server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                self._queue = deque(j for j in self._queue if not j.cancelled)  # timed-out requests leave room
                if len(self._queue) + len(jobs) > self.max_queue:
                    raise QueueFull(f"{len(self._queue)} generations are waiting, this server queues at most "
                                    f"{self.max_queue}")
            self._queue.extend(jobs)
            self._ready.notify()

    def stop(self, message: str = "the server is shutting down") -> None:
        """Refuse new work and end every queued generation with a "stopped" error; the running ones go on."""
        with self._ready:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._ready.notify_all()
        for job in queued:
            if not job.cancelled:
                job.cancel()
                job.on_event(("error", message, "stopped"))

    def fail_running(self, message: str = "the server shut down before this request finished") -> None:
        """End the running generations with a "stopped" error (they leave the batch at the next step)."""
        for job in list(self._running):
            if not job.cancelled:
                job.cancel()
                job.on_event(("error", message, "stopped"))

    def close(self, grace: float = 10.0) -> bool:
        """Stop, let the running generations finish for up to `grace` seconds, then end them; True once the
        thread ended."""
        self.stop()
        self._thread.join(timeout=grace)
        if self._thread.is_alive():
            self.fail_running()
            self._thread.join(timeout=2)
        return not self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Generations waiting (those of requests that timed out or went away are not counted)."""
        return sum(not job.cancelled for job in list(self._queue))

    def retry_after(self) -> int:
        """Seconds a refused client should wait: a place in the queue opens each time a running generation
        finishes, about every (mean generation time / max_batch_size) seconds (at least 1, at most 60)."""
        finished = self.stats["jobs_finished"]
        mean = self.stats["job_seconds"] / finished if finished else 1.0
        return min(60, max(1, math.ceil(mean / self.max_batch_size)))

    # --- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            joining = self._admit()
            if joining is None:
                return
            for adapter in dict.fromkeys(job.adapter for job in joining):
                self._prefill(adapter, [job for job in joining if job.adapter == adapter])
            for adapter in list(self._groups):
                self._step(adapter)

    def _admit(self) -> list[Job] | None:
        """The oldest waiting generations that fit in the free places (waits while there is nothing to do);
        None once the engine is stopped and idle."""
        with self._ready:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                room = self.max_batch_size - len(self._running)
                if self._queue and room > 0:
                    break
                if self._running:
                    return []
                if self._closed:
                    return None
                self._ready.wait()
            joining = []
            while self._queue and len(joining) < room:
                job = self._queue.popleft()
                if not job.cancelled:
                    joining.append(job)
            self._running += joining  # under the lock: a job is always either queued or running for stop()
        self.stats["running"] = len(self._running)
        return joining

    def _prefill(self, adapter: str | None, jobs: list[Job]) -> None:
        """`jobs` join their adapter's group: one prefill pass, whose tokens are their first."""
        now = time.perf_counter()
        for job in jobs:
            job.row = Row(job.prompt_ids, job.max_new_tokens, job.sampling, cancelled=job.cancelled)
            job.joined = now
            self._jobs[id(job.row)] = job
        self.stats["jobs_started"] += len(jobs)
        self.stats["batches"] += 1
        self.stats["batch_rows"] += len(jobs)
        group = self._groups.get(adapter) or Batch(self.model, sorted(self.stop_ids), self.pad_id,
                                                   self.max_batch_size)
        self._groups[adapter] = group
        started = time.perf_counter()
        self._forward(adapter, lambda: group.add([job.row for job in jobs]), jobs)
        self.stats["prefill_seconds"] += time.perf_counter() - started

    def _step(self, adapter: str | None) -> None:
        group = self._groups[adapter]
        events = self._forward(adapter, group.step, [self._jobs[id(row)] for row in group.rows])
        if events:
            self.stats["steps"] += 1
            self.stats["step_rows"] += len(events)

    def _forward(self, adapter: str | None, run: Callable[[], list[Event]], jobs: list[Job]) -> list[Event]:
        """Run one pass of `adapter`'s group and send its events; if it raises, every generation of the group
        (`jobs` among them) gets the error and the group is dropped. Returns the events."""
        started = time.perf_counter()
        try:
            with self._adapter(adapter):
                events = run()
        except Exception as exc:  # one failed pass must not stop the server: its generations get the error
            log.exception("generation failed for a group of %d", len(jobs))
            self.stats["errors"] += 1
            group = self._groups.pop(adapter)
            failed = dict.fromkeys([self._jobs[id(row)] for row in group.rows] + jobs)
            for job in failed:
                job.on_event(("error", f"generation failed: {type(exc).__name__}: {exc}", "failed"))
            self._leave(failed)
            return []
        finally:
            self.stats["decode_seconds"] += time.perf_counter() - started
        self.stats["tokens_generated"] += len(events)
        for row, token, reason in events:
            self._jobs[id(row)].on_event(("token", token, reason))
        group = self._groups[adapter]
        running = {id(row) for row in group.rows}
        self._leave([job for job in jobs if id(job.row) not in running])
        if not group:
            del self._groups[adapter]
        return events

    def _leave(self, jobs: Iterable[Job]) -> None:
        """`jobs` left the running batch (finished, cancelled or failed)."""
        now, jobs = time.perf_counter(), list(jobs)
        gone = set(map(id, jobs))
        for job in jobs:
            self._jobs.pop(id(job.row), None)
            self.stats["job_seconds"] += now - job.joined
        with self._ready:
            self._running = [job for job in self._running if id(job) not in gone]
        self.stats["jobs_finished"] += len(gone)
        self.stats["running"] = len(self._running)

    def _adapter(self, name: str | None):
        """The context of a forward pass of `name`'s group: that adapter active, or all off for None."""
        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        if name != self._active:  # switching walks every module: only when the group changes
            self.model.set_adapter(name)
            self._active = name
        return contextlib.nullcontext()
