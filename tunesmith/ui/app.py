"""The studio's HTTP side: the page, a JSON API over the run folders, and the guard in front of both.

    GET  /                      the page (static/index.html; its scripts and styles under /static/)
    GET  /api/info              folders, recipes, whether launching is allowed
    GET  /api/runs              every run's summary row
    GET  /api/run?id=           one run: summary, config, reports, data report, eval, estimate, checkpoints, jobs
    GET  /api/metrics?id=&offset=   metrics.jsonl records after a byte offset (the page polls it while training)
    GET  /api/config?ref=       a config's YAML text (recipe:NAME or run:ID)
    GET  /api/preview?id=&split=&rows=   prepared rows with loss-bearing tokens marked, and skipped rows
    POST /api/launch  /api/stop  /api/resume  /api/deliver   start or stop commands (when launching is allowed)
    POST /api/chat              a streamed answer from a run's model (server-sent events, OpenAI chunks)

Errors are {"error": "one line"}: 400 a config or request mistake, 401 a missing token, 403 a path outside the
studio's folders or launching switched off, 404 an unknown route.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from tunesmith.errors import TunesmithError
from tunesmith.serve.protocol import APIError
from tunesmith.ui import metrics
from tunesmith.ui.jobs import Jobs
from tunesmith.ui.launch import COMMANDS, Plan, plan_command, plan_delivery, plan_resume
from tunesmith.ui.playground import Playground
from tunesmith.ui.preview import preview
from tunesmith.ui.runs import RunReader, list_runs
from tunesmith.ui.sandbox import Refused, Sandbox

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "tunesmith_ui_token"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
POLICY = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


@dataclass
class Settings:
    sandbox: Sandbox
    allow_launch: bool = True
    token: str | None = None
    hosts: set[str] = field(default_factory=set)  # accepted Host headers (a rebinding guard); empty: any


class LaunchBody(BaseModel):
    command: str
    config: str
    overrides: list[str] = []
    strategies: list[str] = []
    compare: list[str] = []


class RunBody(BaseModel):
    id: str
    overrides: list[str] = []


class DeliverBody(BaseModel):
    id: str
    action: str
    quant: str = "q8_0"


class ChatBody(BaseModel):
    id: str
    messages: list[dict] = Field(min_length=1)
    max_tokens: int = Field(128, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: Optional[int] = None


def create_app(settings: Settings) -> FastAPI:
    """The studio over `settings.sandbox`'s folders."""
    jobs, playground = Jobs(settings.sandbox.root), Playground()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        playground.close()
        jobs.close()  # launched commands go on: they are the CLI's runs

    app = FastAPI(title="tunesmith studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, settings=settings)
    app.state.jobs, app.state.playground = jobs, playground
    _error_handlers(app)
    _page_routes(app, settings)
    _read_routes(app, settings, jobs)
    _action_routes(app, settings, jobs, playground)
    return app


def one_line(message: str) -> str:
    """The message on one line, as the CLI prints its errors."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "unknown error"


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return JSONResponse({"error": one_line(str(exc))}, status_code=403)

    @app.exception_handler(TunesmithError)
    async def user_error(request: Request, exc: TunesmithError):
        return JSONResponse({"error": one_line(str(exc))}, status_code=400)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse({"error": one_line(exc.message)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg')}" if where else first.get("msg")},
                            status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("studio: unhandled error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {one_line(str(exc))}"},
                            status_code=500)


def _page_routes(app: FastAPI, settings: Settings) -> None:
    files = {p.name: p for p in STATIC.iterdir() if p.suffix in TYPES}

    @app.get("/")
    async def page(request: Request):
        if settings.token and request.query_params.get("token"):  # the link printed at start: keep it as a cookie
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
            return response
        return FileResponse(files["index.html"], media_type="text/html", headers={"Content-Security-Policy": POLICY})

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in files:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return FileResponse(files[name], media_type=TYPES[files[name].suffix], headers={"Cache-Control": "no-cache"})


def _read_routes(app: FastAPI, settings: Settings, jobs: Jobs) -> None:
    sandbox = settings.sandbox

    @app.get("/api/info")
    async def info():
        return {"runs": str(sandbox.runs), "configs": str(sandbox.configs), "root": str(sandbox.root),
                "allow_launch": settings.allow_launch, "commands": list(COMMANDS), "recipes": sandbox.recipes()}

    @app.get("/api/runs")
    def runs():
        return {"runs": list_runs(sandbox.runs, jobs)}

    @app.get("/api/run")
    def run(id: str):
        return RunReader(sandbox.run_dir(id), jobs).detail(id)

    @app.get("/api/metrics")
    def run_metrics(id: str, offset: int = 0):
        chunk = metrics.read_chunk(sandbox.run_dir(id) / "metrics.jsonl", offset)
        return {"records": chunk.records, "offset": chunk.offset, "reset": chunk.reset,
                "damaged": len(chunk.damaged), "partial": chunk.partial}

    @app.get("/api/config")
    def config(ref: str):
        return {"ref": ref, "text": sandbox.config_file(ref).read_text(encoding="utf-8", errors="replace")}

    @app.get("/api/preview")
    def data_preview(id: str, split: str = "train", rows: int = 5):
        return preview(sandbox, jobs, sandbox.run_dir(id), split, rows)


def _action_routes(app: FastAPI, settings: Settings, jobs: Jobs, playground: Playground) -> None:
    sandbox = settings.sandbox

    def start(plan: Plan) -> dict:
        job = jobs.start(plan.command, plan.argv, plan.home)
        return {"job": job.to_json(), "run": sandbox.run_id(plan.home)}

    @app.post("/api/launch")
    def launch(body: LaunchBody):
        _require_launch(settings)
        return start(plan_command(sandbox, body.command, body.config, body.overrides, body.strategies,
                                  body.compare))

    @app.post("/api/resume")
    def resume(body: RunBody):
        _require_launch(settings)
        return start(plan_resume(sandbox, body.id, body.overrides))

    @app.post("/api/deliver")
    def deliver(body: DeliverBody):
        _require_launch(settings)
        return start(plan_delivery(sandbox, body.id, body.action, body.quant))

    @app.post("/api/stop")
    def stop(body: RunBody):
        _require_launch(settings)
        run = sandbox.run_dir(body.id)
        alive = [j for j in jobs.list(run) if jobs.alive(j, run)]
        if not alive:
            raise TunesmithError(f"{body.id}: no running job started from the studio to stop")
        for job in alive:
            jobs.stop(job, run)
        return {"stopped": [j.id for j in alive]}

    @app.post("/api/chat")
    async def chat(body: ChatBody):
        return await playground.chat(sandbox.run_dir(body.id), body.messages, body.max_tokens, body.temperature,
                                     body.seed)


def _require_launch(settings: Settings) -> None:
    if not settings.allow_launch:
        raise Refused("launching is off: this studio listens beyond loopback; restart it with --allow-launch "
                      "to start, stop or export runs from the page")


class Guard:
    """ASGI middleware in front of every route: the Host header (a DNS-rebinding guard), the access token (a
    `Bearer` header, or the cookie the start link sets), and for changes a JSON body from this page's own origin
    (a form or script on another site cannot post here)."""

    def __init__(self, app, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._refusal(scope, headers)
        if problem is None:
            return await self.app(scope, receive, send)
        status, message = problem
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        s = self.settings
        host = headers.get("host", "")
        if s.hosts and host not in s.hosts:
            return 403, f"unexpected Host header {host[:100]!r}; open the address the studio printed"
        if s.token and not self._has_token(scope, headers):
            return 401, "this studio needs its access token: open the link it printed (…/?token=…)"
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != host:
                return 403, f"a request from another origin ({origin[:100]}) is refused"
            if not headers.get("content-type", "").startswith("application/json"):
                return 400, "the body must be JSON (Content-Type: application/json)"
        return None

    def _has_token(self, scope, headers: dict[str, str]) -> bool:
        expected = self.settings.token.encode()
        given = headers.get("authorization", "")
        candidates = [given[7:].strip()] if given.lower().startswith("bearer ") else []
        candidates += [c.split("=", 1)[1] for c in headers.get("cookie", "").split("; ") if c.startswith(COOKIE + "=")]
        if scope["path"] == "/":
            from urllib.parse import parse_qs

            candidates += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return any(hmac.compare_digest(c.encode(), expected) for c in candidates)
