"""The engine: one thread that owns the model and decodes queued requests in batches.

Requests wait in one first-in-first-out queue and are never dropped. The engine takes the oldest request and
up to `max_batch_size - 1` more that use the same adapter, decodes them together to the end (a finished row
leaves the batch at once), then takes the next batch. Several LoRA adapters share one base: a batch switches
to its adapter (or runs the base with adapters off) before it starts.

Events go back to the request through its `on_event` callback, from the engine thread:
    ("token", token_id, finish_reason or None)     finish_reason: "stop" (a stop token) or "length"
    ("error", message, None)                         the batch failed; the request is over
"""

from __future__ import annotations

import contextlib
import logging
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


class Engine:
    def __init__(self, model, stop_ids: list[int], pad_id: int, max_batch_size: int = 8):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self._queue: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self.stats = {"jobs_started": 0, "jobs_finished": 0, "batches": 0, "batch_rows": 0, "tokens_generated": 0,
                      "decode_seconds": 0.0, "running": 0, "errors": 0}

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._ready:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._queue.append(job)
            self._ready.notify()

    @property
    def queued(self) -> int:
        return len(self._queue)

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
                job.on_event(("error", f"generation failed: {type(exc).__name__}: {exc}", None))
        finally:
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
