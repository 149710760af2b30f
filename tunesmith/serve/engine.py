"""The engine: one thread that owns the model and decodes queued requests in batches.

Requests wait in one first-in-first-out queue of at most `max_queue` generations; a request that does not fit is
refused at once (QueueFull), never left waiting. The engine takes the oldest generation and up to
`max_batch_size - 1` more that use the same adapter, decodes them together to the end (a finished row leaves the
batch at once), then takes the next batch. Several LoRA adapters share one base: a batch switches to its adapter
(or runs the base with adapters off) before it starts.

Events go back to the request through its `on_event` callback, from the engine thread:
    ("token", token_id, finish_reason or None)     finish_reason: "stop" (a stop token) or "length"
    ("error", message, cause)                       the request is over; cause: "failed" (its batch raised) or
                                                    "stopped" (the engine shut down before it finished)

Shutting down: `stop()` refuses new work (EngineStopped) and ends every queued generation with a "stopped" error
at once; the running batch goes on. `close(grace)` stops, gives the running batch `grace` seconds, then ends its
generations too and joins the thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from tunesmith.serve.generation import Row, Sampling, decode

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One generation (one choice of one HTTP request)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    adapter: str | None  # the adapter's name inside the PeftModel, or None for the base alone
    on_event: Callable[[tuple], None]
    row: Row | None = field(default=None, repr=False)
    cancelled: bool = False

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
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self.stats = {"jobs_started": 0, "jobs_finished": 0, "batches": 0, "batch_rows": 0, "tokens_generated": 0,
                      "decode_seconds": 0.0, "running": 0, "errors": 0}

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
        """Refuse new work and end every queued generation with a "stopped" error; the running batch goes on."""
        with self._ready:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._ready.notify_all()
        for job in queued:
            if not job.cancelled:
                job.cancel()
                job.on_event(("error", message, "stopped"))

    def fail_running(self, message: str = "the server shut down before this request finished") -> None:
        """End the generations of the running batch with a "stopped" error (they leave it at the next token)."""
        for job in list(self._running):
            if not job.cancelled:
                job.cancel()
                job.on_event(("error", message, "stopped"))

    def close(self, grace: float = 10.0) -> bool:
        """Stop, let the running batch finish for up to `grace` seconds, then end it; True once the thread ended."""
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
        """Seconds a refused client should wait: room is made each time a batch starts, so the mean batch time
        (at least 1, at most 60)."""
        batches = self.stats["batches"]
        mean = self.stats["decode_seconds"] / batches if batches else 1.0
        return min(60, max(1, math.ceil(mean)))

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._decode(batch)

    def _next_batch(self) -> list[Job] | None:
        with self._ready:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._closed:
                    return None
                self._ready.wait()
            adapter = self._queue[0].adapter
            batch = [j for j in self._queue if j.adapter == adapter and not j.cancelled][:self.max_batch_size]
            chosen = {id(j) for j in batch}
            self._queue = deque(j for j in self._queue if id(j) not in chosen and not j.cancelled)
            self._running = batch  # under the lock: a job is always either queued or running for stop()
            return batch

    def _decode(self, batch: list[Job]) -> None:
        for job in batch:
            job.row = Row(job.prompt_ids, job.max_new_tokens, job.sampling, cancelled=job.cancelled)
        self.stats["jobs_started"] += len(batch)
        self.stats["batches"] += 1
        self.stats["batch_rows"] += len(batch)
        self.stats["running"] = len(batch)
        started = time.perf_counter()
        try:
            with self._adapter(batch[0].adapter):
                for step in decode(self.model, [j.row for j in batch], self.stop_ids, self.pad_id):
                    self.stats["tokens_generated"] += len(step)
                    for index, token, reason in step:
                        batch[index].on_event(("token", token, reason))
        except Exception as exc:  # one failed batch must not stop the server: its requests get the error
            log.exception("generation failed for a batch of %d", len(batch))
            self.stats["errors"] += 1
            for job in batch:
                job.on_event(("error", f"generation failed: {type(exc).__name__}: {exc}", "failed"))
        finally:
            self._running = []
            self.stats["decode_seconds"] += time.perf_counter() - started
            self.stats["jobs_finished"] += len(batch)
            self.stats["running"] = 0

    def _adapter(self, name: str | None):
        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()
