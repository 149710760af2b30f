"""`tunesmith serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one base model and its adapters.

    GET  /v1/models                 the served model ids (the model's name, and NAME of each --adapter)
    POST /v1/chat/completions       messages through the model's chat template; stream=true for server-sent events
    POST /v1/completions            plain-text (or token id) prompts
    GET  /health                    liveness, queue depth (no key needed); 503 while shutting down
    GET  /metrics                   Prometheus text: requests by route and status, tokens, queue, batches

Binds 127.0.0.1 unless told otherwise. With an API key (--api-key or TUNESMITH_API_KEY) every /v1 route and
/metrics need `Authorization: Bearer KEY` (else 401). Errors use OpenAI's body {"error": {message, type, param,
code}}: 400 invalid JSON, unsupported feature or a prompt over the limits, 404 unknown model, 413 a body over
--max-request-bytes, 422 a field of the wrong type or range.

Under load: at most --max-queue generations wait; a request that does not fit gets 429 at once, and one during
shutdown 503, both with Retry-After. A request gets its answer within --request-timeout seconds (504, or an error
chunk in a stream that has started). SIGTERM or SIGINT: stop accepting, answer queued requests 503, let the
running batch finish (up to --shutdown-grace seconds), join the engine, exit 0 (see lifecycle.py).
"""

import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import time

from tunesmith.errors import ConfigError
from tunesmith.serve.protocol import APIError, error_body

log = logging.getLogger(__name__)

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  adapters: list[str] = (), max_prompt_tokens: int = 4096, max_tokens_limit: int = 1024,
                  max_batch_size: int = 8, max_request_bytes: int = 1_000_000, base: str | None = None,
                  adapter_dir: str | None = None, max_queue: int = 256, request_timeout: float = 600.0,
                  shutdown_grace: float = 10.0, threads: int | None = None) -> int:
    """Load the model, bind host:port and serve until SIGTERM or SIGINT. Returns the exit code (0)."""
    require_serve_packages()
    for option, value in (("--max-prompt-tokens", max_prompt_tokens), ("--max-tokens-limit", max_tokens_limit),
                          ("--max-batch-size", max_batch_size), ("--max-request-bytes", max_request_bytes),
                          ("--max-queue", max_queue)):
        if value < 1:
            raise ConfigError(f"{option}: must be at least 1, got {value}")
    for option, value in (("--request-timeout", request_timeout), ("--shutdown-grace", shutdown_grace)):
        if not value > 0:
            raise ConfigError(f"{option}: must be a positive number of seconds, got {value}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads: must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)  # the engine's CPU threads; 1 on a small shared machine (docs/PERFORMANCE.md)
    from tunesmith.serve.service import Limits, load_service

    api_key = api_key or os.environ.get("TUNESMITH_API_KEY") or None
    if not api_key and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use the model", host)
    sock = bind(host, port)
    limits = Limits(max_prompt_tokens, max_tokens_limit, max_request_bytes, max_queue=max_queue,
                    request_timeout=request_timeout)
    service = load_service(model, list(adapters), max_batch_size, limits, api_key, base, adapter_dir=adapter_dir)
    print(f"serving {', '.join(service.models)} at http://{host}:{sock.getsockname()[1]}/v1 "
          f"({'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(service, sock, shutdown_grace)
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then passed the SIGINT or SIGTERM on
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.engine.close(shutdown_grace)
    print("stopped", flush=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the server as Ctrl-C does, with exit code 0


def create_app(service):
    """The FastAPI application over a loaded Service."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    from tunesmith.serve import handlers

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, service=service)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        engine = service.engine
        body = {"status": "stopping" if engine.stopped else "ok", "models": list(service.models),
                "queued": engine.queued, "max_queue": engine.max_queue, "running": engine.stats["running"]}
        return JSONResponse(body, status_code=503 if engine.stopped else 200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(service), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(name) for name in service.models]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        service.adapter_for(model_id)
        return _model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handlers.chat(service, await read_json(request, service.limits.max_request_bytes))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handlers.complete(service, await read_json(request, service.limits.max_request_bytes))

    return app


class Guard:
    """ASGI middleware: the API key (401) and the body size from Content-Length (413) are checked before any
    route runs; every response is counted by route and status for /metrics."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._refusal(path, headers)
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if error is not None:
            from fastapi.responses import JSONResponse

            await JSONResponse(error.body(), status_code=error.status,
                               headers={"WWW-Authenticate": "Bearer"} if error.status == 401 else None)(
                scope, receive, counted_send)
        else:
            await self.app(scope, receive, counted_send)
        route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        key = (route, status.get("code", 500))
        requests = self.service.counters["requests"]
        requests[key] = requests.get(key, 0) + 1

    def _refusal(self, path: str, headers: dict) -> APIError | None:
        key = self.service.api_key
        if key and (path.startswith("/v1") or path == "/metrics"):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                                None, "invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.service.limits.max_request_bytes:
            return APIError(413, f"the request body has {length} bytes, more than this server's limit of "
                            f"{self.service.limits.max_request_bytes}", None, "request_too_large")
        return None


async def read_json(request, max_bytes: int):
    """The JSON body, read in chunks so that a body without Content-Length still stops at `max_bytes` (413)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                           None, "request_too_large")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", None, "invalid_json") from None


def prometheus_text(service) -> str:
    """The counters in Prometheus' text exposition format."""
    stats, counters = service.engine.stats, service.counters
    lines = ["# HELP tunesmith_requests_total HTTP responses by route and status code.",
             "# TYPE tunesmith_requests_total counter"]
    for (route, code), count in sorted(counters["requests"].items()):
        lines.append(f'tunesmith_requests_total{{route="{route}",status="{code}"}} {count}')
    for name, kind, value, help_text in (
            ("prompt_tokens_total", "counter", counters["prompt_tokens"], "Prompt tokens of finished requests."),
            ("completion_tokens_total", "counter", counters["completion_tokens"],
             "Generated tokens of finished requests."),
            ("generated_tokens_total", "counter", stats["tokens_generated"], "Tokens decoded by the engine."),
            ("batches_total", "counter", stats["batches"], "Batches decoded."),
            ("batch_rows_total", "counter", stats["batch_rows"], "Generations decoded (sum of batch sizes)."),
            ("decode_seconds_total", "counter", round(stats["decode_seconds"], 6), "Seconds spent decoding."),
            ("engine_errors_total", "counter", stats["errors"], "Batches that failed."),
            ("queue_depth", "gauge", service.engine.queued, "Generations waiting for the engine."),
            ("queue_limit", "gauge", service.engine.max_queue, "Generations the queue holds at most (--max-queue)."),
            ("running", "gauge", stats["running"], "Generations being decoded.")):
        lines += [f"# HELP tunesmith_{name} {help_text}", f"# TYPE tunesmith_{name} {kind}",
                  f"tunesmith_{name} {value}"]
    return "\n".join(lines) + "\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port); a clear error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def make_server(service, grace: float = 10.0):
    """A uvicorn server for `service` that shuts its engine down with it (lifecycle.py);
    `.run(sockets=[sock])` serves on a bound socket until SIGTERM, SIGINT or `.should_exit = True`."""
    from tunesmith.serve.lifecycle import GracefulServer

    return GracefulServer(create_app(service), service.engine, grace)


def run(service, sock: socket.socket, grace: float = 10.0) -> None:
    make_server(service, grace).run(sockets=[sock])


def require_serve_packages() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if not _importable(name)]
    if missing:
        raise ConfigError(f'tunesmith serve needs {" and ".join(missing)}: pip install "tunesmith[serve]"')


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "tunesmith"}
