"""Stopping a run cleanly on SIGTERM / SIGINT (a preempted machine, Ctrl-C): the loop finishes the step in
progress, writes a checkpoint at that step boundary and returns; `--resume` continues bitwise."""

from __future__ import annotations

import logging
import signal
import threading

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)


class Preemption:
    """SIGTERM/SIGINT handlers for the duration of `fit`: the first signal sets a flag that the loop reads at
    the next step boundary; a second one restores the previous handlers and re-raises, stopping at once.

    Installed only in the main thread (Python delivers signals there) and not over a signal that was
    ignored (a launcher that ignores SIGINT keeps ignoring it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.name is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.name = signal.Signals(signum).name
        log.warning("received %s: finishing this step, then saving a checkpoint (send it again to stop at once)",
                    self.name)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process got a signal (all processes must agree, or their checkpoint barriers would hang)."""
        if accelerator.num_processes == 1:
            return self.name is not None
        flag = torch.tensor(int(self.name is not None), device=accelerator.device)
        if int(accelerator.reduce(flag, "sum")) and self.name is None:
            self.name = "a signal to another process"
        return self.name is not None
