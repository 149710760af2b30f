"""`tunesmith ui`: serve the studio over the runs folder.

Safe by default: it binds 127.0.0.1; any other address needs an access token (--token or TUNESMITH_UI_TOKEN),
and launching commands from the page is then off unless --allow-launch. On loopback, requests must name a
loopback Host (so a web page cannot reach the studio through a rebound DNS name).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import secrets
from pathlib import Path

from tunesmith.errors import ConfigError

REQUIRED = ("fastapi", "uvicorn", "psutil")


def require_ui_packages() -> None:
    """One line naming the install command when the ui extra is missing."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f'tunesmith ui needs {", ".join(missing)}: pip install "tunesmith[ui]"')


def ui_command(runs: str = "runs", host: str = "127.0.0.1", port: int = 8765, allow_launch: bool = False,
               token: str | None = None, configs: str = "configs") -> int:
    """Serve the studio until Ctrl-C or SIGTERM; returns the exit code (0). Runs it started go on."""
    require_ui_packages()
    token = token or os.environ.get("TUNESMITH_UI_TOKEN") or None
    loopback = is_loopback(host)
    if not loopback and not token:
        raise ConfigError(f"--host {host}: listening beyond loopback needs an access token: pass --token "
                          f"{secrets.token_urlsafe(16)} (or set TUNESMITH_UI_TOKEN)")
    root = Path.cwd()
    if not (root / runs).expanduser().is_dir():
        (root / runs).expanduser().mkdir(parents=True)
    from tunesmith.serve.server import bind
    from tunesmith.ui.app import Settings, create_app
    from tunesmith.ui.sandbox import Sandbox

    sock = bind(host, port)
    bound = sock.getsockname()[1]
    settings = Settings(Sandbox(root, Path(runs), Path(configs)), allow_launch=allow_launch or loopback, token=token,
                        hosts=loopback_hosts(bound) | {f"{host}:{bound}"} if loopback else set())
    address = f"http://{'[' + host + ']' if ':' in host else host}:{bound}/" + (f"?token={token}" if token else "")
    print(f"tunesmith studio at {address} over {settings.sandbox.runs} (launching "
          f"{'on' if settings.allow_launch else 'off: --allow-launch turns it on'}); Ctrl-C stops", flush=True)
    serve(create_app(settings), sock)
    return 0


def serve(app, sock) -> None:
    """uvicorn on an already bound socket until SIGINT/SIGTERM."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    server.run(sockets=[sock])


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_hosts(port: int) -> set[str]:
    """The Host headers a browser sends for the loopback studio."""
    return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
