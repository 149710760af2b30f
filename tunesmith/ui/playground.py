"""Chat with a run's model: tunesmith.serve loads it (`load_service`: the run's chat template, its stop tokens,
its adapter on its base) and answers through the same route as `tunesmith serve` (`handlers.chat`), so the
studio has no generator of its own. A few models stay loaded; the least recently used one is closed first.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from tunesmith.errors import ConfigError
from tunesmith.serve import handlers
from tunesmith.serve.service import Limits, Service, load_service

LIMITS = Limits(max_prompt_tokens=4096, max_tokens_limit=1024, max_queue=16, request_timeout=300.0)


class Playground:
    """The loaded models, keyed by run folder (and reloaded when its final/ changes)."""

    def __init__(self, max_loaded: int = 2) -> None:
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[tuple[Path, float], Service] = OrderedDict()
        self._lock = asyncio.Lock()

    async def service(self, run: Path) -> Service:
        """The run's model, loaded once (in a worker thread: loading takes seconds)."""
        final = run / "final"
        if not final.is_dir():
            raise ConfigError(f"{run.name}: no final/ model yet (training has not finished); nothing to chat with")
        key = (run, final.stat().st_mtime)
        async with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            service = await run_in_threadpool(load_service, str(run), limits=LIMITS, max_batch_size=4)
            self._loaded[key] = service
            while len(self._loaded) > self.max_loaded:
                _, old = self._loaded.popitem(last=False)
                old.engine.close(grace=1.0)
            return service

    async def chat(self, run: Path, messages: list[dict], max_tokens: int, temperature: float,
                   seed: int | None = None):
        """A streamed answer in the OpenAI chunk format (server-sent events), as `tunesmith serve` sends it."""
        service = await self.service(run)
        body = {"model": next(iter(service.models)), "messages": messages, "stream": True,
                "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        return await handlers.chat(service, body)

    def close(self) -> None:
        for service in self._loaded.values():
            service.engine.close(grace=1.0)
        self._loaded.clear()
