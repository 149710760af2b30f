"""A uvicorn server that shuts the engine down with it, so that every request in flight gets an answer.

On SIGTERM/SIGINT (uvicorn's handlers, main thread) or `server.should_exit = True`:
1. the engine refuses new work and answers every queued request 503 (Retry-After) at once;
2. uvicorn stops accepting connections and waits for the responses in flight;
3. the running batch has `grace` seconds to finish; what is left of it then gets 503 as well;
4. the engine thread is joined (`engine_joined` says whether it ended).
uvicorn's own limit on waiting for responses is `grace + 5` s, a backstop that should never be reached.
"""

from __future__ import annotations

import asyncio

import uvicorn


class GracefulServer(uvicorn.Server):
    def __init__(self, app, engine, grace: float = 10.0):
        # keep-alive longer than clients' (httpx, and so openai's client, drop idle connections after 5 s): else a
        # client that reuses a connection just as the server closes it gets a ReadError (seen under overload)
        super().__init__(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30,
                                        timeout_graceful_shutdown=int(grace) + 5))
        self.engine, self.grace = engine, grace
        self.engine_joined: bool | None = None

    async def shutdown(self, sockets=None) -> None:
        self.engine.stop()
        closing = asyncio.create_task(asyncio.to_thread(self.engine.close, self.grace))
        await super().shutdown(sockets)
        self.engine_joined = await closing
