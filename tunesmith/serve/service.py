"""What the HTTP layer serves: the model (a base and its adapters), tokenizer, limits, and the generations of
requests in flight.

    service = load_service("runs/x", adapters=["terse=runs/y"])
    names = service.models   # served model id -> adapter inside the PeftModel (None: the base alone)

A request is answered within `Limits.request_timeout` seconds, queueing included (504, or an error chunk once a
stream has started); one that finds the queue full gets 429 and one that comes during shutdown 503, both at
once and with a Retry-After header.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.model.loading import attach_adapter, best_device, context_length, load_model_and_tokenizer
from tunesmith.model.resolve import require_generative, resolve_source
from tunesmith.model.load import load_tokenizer
from tunesmith.model.stops import stop_token_ids
from tunesmith.serve.adapters import configured_adapters
from tunesmith.serve.engine import Engine, EngineStopped, Job, QueueFull
from tunesmith.serve.generation import Sampling, TextStream
from tunesmith.serve.protocol import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for (and the default)
    max_request_bytes: int = 1_000_000
    max_choices: int = 64  # n times the number of prompts of one request
    max_queue: int = 256  # generations waiting for the engine; a request that does not fit gets 429
    request_timeout: float = 600.0  # seconds from arrival to the last token; then 504
    shutdown_retry_after: int = 10  # the Retry-After of a 503 during shutdown


@dataclass
class Service:
    engine: Engine
    tokenizer: object
    models: dict[str, str | None]
    context: int
    limits: Limits = Limits()
    api_key: str | None = None
    counters: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "requests": {}})

    def adapter_for(self, model: str) -> str | None:
        if model not in self.models:  # only a configured name: never a path
            raise APIError(404, f"model {model[:100]!r} not found; this server has: {', '.join(self.models)}", "model",
                           "model_not_found")
        return self.models[model]

    def check_room(self) -> None:
        """429 (or 503) at once, before any work on the request, when the queue is full (or the server is
        shutting down); the generations' submission checks again, atomically."""
        engine = self.engine
        if engine.stopped:
            raise self.stopping("the server is shutting down")
        if engine.queued >= engine.max_queue:
            raise self.busy(f"{engine.max_queue} generations are waiting, as many as this server queues")

    def busy(self, reason: str) -> APIError:
        return APIError(429, f"the server is busy: {reason}; retry later", None, "queue_full", "rate_limit_error",
                        {"Retry-After": str(self.engine.retry_after())})

    def stopping(self, reason: str) -> APIError:
        return APIError(503, f"{reason}; retry later", None, "shutting_down", "server_error",
                        {"Retry-After": str(self.limits.shutdown_retry_after)})

    def max_new_tokens(self, requested: int | None, prompt_length: int, param: str) -> int:
        """The length limit of one generation, within the server's limit and the model's context."""
        limit = self.limits.max_tokens_limit
        if requested is not None and requested > limit:
            raise APIError(400, f"{param}: {requested} is more than this server's limit of {limit}", param)
        room = self.context - prompt_length
        wanted = requested if requested is not None else min(limit, room)
        if wanted > room or room <= 0:
            raise APIError(400, f"this model's context is {self.context} tokens; the prompt has {prompt_length} "
                           f"and {wanted} more were asked for", param, "context_length_exceeded")
        return wanted

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, more than this server's limit of "
                           f"{self.limits.max_prompt_tokens}", param, "context_length_exceeded")
        vocab = len(self.tokenizer)
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"{param}: token ids must be in [0, {vocab})", param)


class Generation:
    """The choices of one request, submitted to the engine and read back as text deltas.

    Usage counts what the model processed and produced: prompt tokens once per prompt, and every generated
    token, the end-of-turn or stop token included (text stops before a stop string, but the tokens that made it
    were generated).
    """

    def __init__(self, service: Service, prompts: list[list[int]], n: int, max_new_tokens: list[int],
                 sampling: Sampling, stop: list[str], adapter: str | None):
        if len(prompts) * n > service.limits.max_choices:
            raise APIError(400, f"n: {len(prompts)} prompt(s) x n={n} is more than {service.limits.max_choices} "
                           "generations in one request", "n")
        if len(prompts) * n > service.limits.max_queue:
            raise APIError(400, f"n: {len(prompts)} prompt(s) x n={n} is more generations than this server's queue "
                           f"holds ({service.limits.max_queue})", "n")
        loop = asyncio.get_running_loop()
        self.loop, self.deadline = loop, loop.time() + service.limits.request_timeout
        self.service = service
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs, self.streams = [], []
        for prompt, limit in zip(prompts, max_new_tokens):
            for k in range(n):
                seed = None if sampling.seed is None else sampling.seed + k
                self.jobs.append(Job(prompt, limit, Sampling(sampling.temperature, sampling.top_p, seed), adapter,
                                     partial(self._post, loop, len(self.jobs))))
                self.streams.append(TextStream(service.tokenizer, stop))
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = [0] * len(self.jobs)
        self.done = [False] * len(self.jobs)

    def start(self) -> "Generation":
        """Queue the generations; 429 when the queue is full, 503 when the server is shutting down."""
        try:
            self.service.engine.submit(self.jobs)
        except QueueFull as exc:
            raise self.service.busy(str(exc)) from None
        except EngineStopped as exc:
            raise self.service.stopping(str(exc)) from None
        return self

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self):
        """Yields (choice index, text delta, finish reason or None) until every choice has finished."""
        remaining = len(self.jobs)
        while remaining:
            index, (kind, value, reason) = await self._next_event()
            if self.done[index]:
                continue
            if kind == "error":
                self.cancel()
                raise self._error(value, reason)
            self.completion_tokens[index] += 1
            stream = self.streams[index]
            text = "" if reason == "stop" else stream.push(value)  # a stop token is not text
            if stream.stopped:
                reason = "stop"
                self.jobs[index].cancel()
            if reason is not None:
                text += stream.finish()
                self.done[index] = True
                remaining -= 1
            if text or reason is not None:
                yield index, text, reason
        self._count()

    async def _next_event(self) -> tuple:
        """The next engine event, or 504 once the request's time is up (its generations are cancelled)."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        try:
            return await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - self.loop.time()))
        except TimeoutError:
            self.cancel()
            raise APIError(504, f"the request did not finish within this server's limit of "
                           f"{self.service.limits.request_timeout:g} seconds", None, "timeout",
                           "server_error") from None

    def _error(self, message: str, cause: str) -> APIError:
        if cause == "stopped":
            return self.service.stopping(message)
        return APIError(500, message, kind="server_error")

    def usage(self) -> dict:
        from tunesmith.serve.protocol import usage

        return usage(self.prompt_tokens, sum(self.completion_tokens))

    def _count(self) -> None:
        self.service.counters["prompt_tokens"] += self.prompt_tokens
        self.service.counters["completion_tokens"] += sum(self.completion_tokens)

    def _post(self, loop, index: int, event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


def load_service(model: str, adapters: list[str] = (), max_batch_size: int = 8, limits: Limits = Limits(),
                 api_key: str | None = None, base: str | None = None, dtype: str = "auto",
                 adapter_dir: str | None = None) -> Service:
    """Load the model (and the extra adapters, on the same base) and start the engine.

    Args:
        model: a model, run or adapter directory; served under its directory's (or run's) name.
        adapters: "NAME=PATH" adapter (or run) directories trained on the same base, served under NAME.
        adapter_dir: a directory whose adapter folders are all served, each under its folder's name.
    """
    extra = configured_adapters(list(adapters), adapter_dir)  # names and paths checked before anything loads
    src = resolve_source(model, base)
    require_generative(src)
    names: dict[str, str | None] = {src.name: "a0" if src.adapter else None}  # PEFT names may not contain "."
    loaded, tokenizer = load_model_and_tokenizer(src, dtype=dtype, adapter_name="a0")
    for i, (name, path) in enumerate(extra, start=1):
        if name in names:
            raise ConfigError(f"--adapter: the model name {name!r} is the served model's own")
        other = resolve_source(str(path))
        require_generative(other)
        _check_compatible(name, other, src, tokenizer)
        loaded = attach_adapter(loaded, other.adapter, f"a{i}")
        names[name] = f"a{i}"
    loaded = loaded.to(best_device()).eval()
    inner = loaded.get_base_model() if hasattr(loaded, "get_base_model") else loaded
    stops = stop_token_ids(inner)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    engine = Engine(loaded, stops, pad, max_batch_size, limits.max_queue).start()
    log.info("serving %s", ", ".join(names))
    return Service(engine, tokenizer, names, context_length(inner), limits, api_key)


def _check_compatible(name: str, other, src, tokenizer) -> None:
    """An extra adapter must sit on the same base, with the same vocabulary and chat template."""
    if other.adapter is None:
        raise ConfigError(f"--adapter {name}: {other.path} is a full model, not an adapter")
    if _same_path(other.weights) != _same_path(src.weights):
        raise ConfigError(f"--adapter {name}: trained on {other.weights}, but the served base is {src.weights}")
    if other.quant != src.quant:
        raise ConfigError(f"--adapter {name}: its base quantisation (QLoRA or not) differs from the served model's")
    theirs = load_tokenizer(other.tokenizer)
    if theirs.get_vocab() != tokenizer.get_vocab() or theirs.chat_template != tokenizer.chat_template:
        raise ConfigError(f"--adapter {name}: its tokenizer (vocabulary or chat template) differs from the served "
                          "model's")


def _same_path(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
