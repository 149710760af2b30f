"""The server under load, overload, stuck generations and shutdown, over real HTTP on loopback.

The scripted tiny model of test_serve answers each chat prompt with "It is five." in 8 tokens, so a request
costs a few milliseconds of decoding; a forward pre-hook that sleeps makes it slow (or stuck) where a test needs
a queue to build up. Every test checks that each request got an answer (a status and an OpenAI-shaped body, or a
complete stream) and that nothing was left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from test_serve import ANSWER, QUESTION, scripted_model_dir
from tunesmith.serve.engine import Engine
from tunesmith.serve.server import bind, make_server
from tunesmith.serve.service import Limits, Service, load_service


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer):
    """The scripted model, loaded once; each test serves it through a fresh engine (`serving`)."""
    base = scripted_model_dir(tmp_path_factory.mktemp("load") / "tiny-chat", tokenizer)
    service = load_service(str(base))
    service.engine.close()
    return SimpleNamespace(base=base, service=service)


@contextlib.contextmanager
def serving(loaded, max_batch_size: int = 8, grace: float = 10.0, **limits):
    """A server on a free loopback port in a thread, over a new engine on the loaded model; stops on exit and
    checks that the server thread and the engine thread both ended."""
    old = loaded.service
    limits = Limits(**{"max_tokens_limit": 48, **limits})
    engine = Engine(old.engine.model, sorted(old.engine.stop_ids), old.engine.pad_id, max_batch_size,
                    limits.max_queue).start()
    service = Service(engine, old.tokenizer, dict(old.models), old.context, limits)
    sock = bind("127.0.0.1", 0)
    http = make_server(service, grace)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.01)
    run = SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", service=service, http=http,
                          thread=thread)
    try:
        yield run
    finally:
        http.should_exit = True
        thread.join(timeout=grace + 10)
        assert not thread.is_alive(), "the server thread did not end"
        assert http.engine_joined and not engine._thread.is_alive(), "the engine thread did not end"


@contextlib.contextmanager
def slow_model(model, seconds: float):
    """Every forward pass of `model` takes at least `seconds` longer."""
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def chat_body(stream: bool = False, **extra) -> dict:
    return {"model": "tiny-chat", "messages": QUESTION, "temperature": 0, "stream": stream, **extra}


async def post(client: httpx.AsyncClient, url: str, body: dict) -> SimpleNamespace:
    """One request: its status, headers, JSON body (or the parsed events of a stream) and latency."""
    started = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        raw = (await response.aread()).decode()
    latency = time.perf_counter() - started
    if body.get("stream") and response.status_code == 200:
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        return SimpleNamespace(status=200, headers=response.headers, chunks=chunks, done=events[-1:] == ["[DONE]"],
                               latency=latency, json=None)
    return SimpleNamespace(status=response.status_code, headers=response.headers, json=json.loads(raw),
                           chunks=None, latency=latency)


def streamed_text(result) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in result.chunks if c.get("choices"))


def reply_text(result) -> str | None:
    """The chat answer of a reply or of a stream; None for an error body."""
    if result.chunks is not None:
        return streamed_text(result)
    return result.json["choices"][0]["message"]["content"] if "choices" in result.json else None


def stream_error(result) -> dict | None:
    return next((c["error"] for c in result.chunks if "error" in c), None)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def test_percentile_interpolates_between_order_statistics():
    """[1, 2, 3, 4]: the median sits halfway between 2 and 3; p99 at rank 0.99 * 3 = 2.97, i.e. 3.97."""
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert abs(percentile([1, 2, 3, 4], 99) - 3.97) < 1e-12
    assert percentile([7.0], 99) == 7.0


def test_500_requests_at_32_concurrent_all_succeed(loaded):
    """500 requests from 32 concurrent clients (openai's async client over httpx): chat, streamed chat and
    completions mixed; every one answers exactly what the scripted model says; p50/p99 latency printed."""
    total, concurrency = 500, 32
    with serving(loaded) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        latencies, failures, kinds = [], [], {"chat": 0, "stream": 0, "completion": 0}
        pending = iter(range(total))

        async def one(i: int) -> None:
            kind = ("chat", "stream", "completion", "chat")[i % 4]
            started = time.perf_counter()
            try:
                if kind == "stream":
                    chunks = [c async for c in await client.chat.completions.create(
                        model="tiny-chat", messages=QUESTION, temperature=0, stream=True)]
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    ok = text == ANSWER and chunks[-1].choices[0].finish_reason == "stop"
                elif kind == "chat":
                    reply = await client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0)
                    ok = reply.choices[0].message.content == ANSWER and reply.usage.completion_tokens == 8
                else:
                    reply = await client.completions.create(model="tiny-chat", prompt="The capital of France is",
                                                            max_tokens=3, temperature=0)
                    ok = reply.choices[0].text == " five" and reply.choices[0].finish_reason == "length"
            except Exception as exc:  # a failure is counted and reported, not raised from the worker
                ok = f"{type(exc).__name__}: {exc}"
            latencies.append(time.perf_counter() - started)
            kinds[kind] += 1
            if ok is not True:
                failures.append((i, kind, ok))

        async def worker() -> None:
            for i in pending:
                await one(i)

        async def main() -> float:
            started = time.perf_counter()
            try:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
            finally:
                await client.close()
            return time.perf_counter() - started

        wall = asyncio.run(main())
        stats = dict(server.service.engine.stats)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    print(f"\nserve load: {total} requests, {concurrency} concurrent, {len(failures)} failures; "
          f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {total / wall:.0f} requests/s; "
          f"{stats['steps']} decode steps of {stats['step_rows'] / stats['steps']:.1f} rows on average; {kinds}")
    assert failures == [], failures[:5]
    assert len(latencies) == total and kinds == {"chat": 250, "stream": 125, "completion": 125}
    assert stats["step_rows"] / stats["steps"] > 2, "concurrent requests were decoded together"


def test_overload_is_refused_at_once_with_429_and_retry_after(loaded):
    """A queue of 4 generations and a slow model (50 ms a forward pass): of 48 concurrent requests (a third
    streamed) some are served and the rest refused with 429 before any decoding ends; the refusals carry
    OpenAI's error body and a Retry-After; a streamed request is refused with the status too (not a 200 whose
    stream then fails). No request hangs: each one gets an answer well within the client's timeout. A request
    for more generations than the queue can ever hold is a 400, not a 429 to retry forever."""
    with serving(loaded, max_batch_size=2, max_queue=4) as server, slow_model(server.service.engine.model, 0.05):
        async def main():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
                return await asyncio.gather(*(post(client, server.url + "/v1/chat/completions",
                                                   chat_body(stream=i % 3 == 0)) for i in range(48)))

        results = asyncio.run(main())
        served = [r for r in results if r.status == 200]
        refused = [r for r in results if r.status == 429]
        assert len(served) + len(refused) == 48, sorted({r.status for r in results})
        assert len(served) >= 4 and len(refused) >= 12, (len(served), len(refused))
        assert all(reply_text(r) == ANSWER for r in served)
        for r in refused:
            assert r.json["error"]["code"] == "queue_full" and r.json["error"]["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
        assert max(r.latency for r in refused) < max(r.latency for r in served), "429 without waiting"
        assert server.service.engine.queued == 0
        text = httpx.get(server.url + "/metrics").text
        assert re.search(r'tunesmith_requests_total\{route="/v1/chat/completions",status="429"\} [1-9]', text)
        never = httpx.post(server.url + "/v1/chat/completions", json=chat_body(n=5))
        assert never.status_code == 400 and "queue holds (4)" in never.json()["error"]["message"]


def test_a_stuck_generation_times_out_with_504_or_an_error_chunk(loaded):
    """Each forward pass takes 1.5 s and requests may take 0.4 s: a request, a queued one behind it and a streamed
    one all get their answer after about 0.4 s -- 504 with code "timeout", or (the stream) a 200 whose stream
    ends with an error chunk and [DONE]; their generations are cancelled, so the queue empties."""
    with serving(loaded, max_batch_size=1, request_timeout=0.4) as server, slow_model(server.service.engine.model, 1.5):
        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                url = server.url + "/v1/chat/completions"
                return await asyncio.gather(post(client, url, chat_body()), post(client, url, chat_body(n=2)),
                                            post(client, url, chat_body(stream=True)))

        plain, queued, stream = asyncio.run(main())
        for r in (plain, queued):
            error = r.json["error"]
            assert r.status == 504 and error["code"] == "timeout" and "0.4 seconds" in error["message"]
            assert r.latency < 1.4, "answered before the stuck forward pass ended"
        assert stream.status == 200 and stream_error(stream)["code"] == "timeout" and stream.done
        assert server.service.engine.queued == 0


def test_shutdown_answers_every_request_and_joins_the_engine(loaded):
    """Shutdown with a full batch running (2 requests) and the other 8 of 10 queued (half streamed): the running
    ones finish with the full answer, the queued ones get 503 + Retry-After (a streamed one, whose 200 has been
    sent, gets an error chunk and [DONE]); the port closes, the server and engine threads end (checked by
    `serving`). A forward pass takes 0.2 s, so the batch outlasts the moment shutdown begins (and, being full,
    takes no queued request in before the engine stops)."""
    with serving(loaded, max_batch_size=2) as server, slow_model(server.service.engine.model, 0.2):
        engine = server.service.engine

        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                tasks = [asyncio.create_task(post(client, server.url + "/v1/chat/completions",
                                                  chat_body(stream=i % 2 == 1))) for i in range(10)]
                while engine.queued + engine.stats["running"] < 10 or engine.stats["running"] < 2:
                    await asyncio.sleep(0.01)
                server.http.should_exit = True
                return engine.stats["running"], await asyncio.gather(*tasks)

        running, results = asyncio.run(main())
        server.thread.join(timeout=20)
        answered = [r for r in results if reply_text(r) == ANSWER]
        refused = [r for r in results if all(r is not a for a in answered)]
        assert running == 2 and len(answered) == running and len(refused) == 10 - running
        for r in refused:
            error = stream_error(r) if r.chunks is not None else r.json["error"]
            assert error["code"] == "shutting_down", error
            if r.chunks is None:
                assert r.status == 503 and int(r.headers["retry-after"]) >= 1
            else:
                assert r.done
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")


def test_sigterm_under_load_answers_everything_and_returns_0(model_dirs, monkeypatch):
    """`serve_command` in the main thread (as the CLI runs it) on a random tiny Llama, 24 concurrent requests of
    48 tokens in batches of 2, SIGTERM while at least 8 are queued: every request gets 200 or 503 (a streamed one
    an error chunk), the command prints "stopped" and returns 0; the signal is not passed on to kill the process."""
    import tunesmith.serve.server as server_module

    sockets = []
    monkeypatch.setattr(server_module, "bind", lambda *a: sockets.append(bind(*a)) or sockets[-1])
    outcome = {}

    def client() -> None:
        while not sockets:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"

        async def main():
            async with httpx.AsyncClient(timeout=60) as http:
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(url + "/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
                body = {"model": "llama", "prompt": "Hello", "max_tokens": 48, "temperature": 0}
                tasks = [asyncio.create_task(post(http, url + "/v1/completions", {**body, "stream": i % 4 == 0}))
                         for i in range(24)]
                deadline = time.monotonic() + 30
                while (await http.get(url + "/health")).json()["queued"] < 8:
                    assert time.monotonic() < deadline, "the requests never queued up"
                    await asyncio.sleep(0.02)
                os.kill(os.getpid(), signal.SIGTERM)
                return await asyncio.gather(*tasks)

        try:
            outcome["results"] = asyncio.run(main())
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc
            os.kill(os.getpid(), signal.SIGTERM)  # stop the server so that the test ends

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    code = server_module.serve_command(str(model_dirs["llama"]), port=0, max_batch_size=2, shutdown_grace=20)
    thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    results = outcome["results"]
    statuses = [r.status for r in results]
    assert code == 0 and set(statuses) <= {200, 503}, statuses
    finished = [r for r in results if r.status == 200 and (r.chunks is None or stream_error(r) is None)]
    assert 1 <= len(finished) < 24, statuses
    for r in results:
        if all(r is not f for f in finished):
            assert (r.json["error"] if r.chunks is None else stream_error(r))["code"] == "shutting_down"
    print(f"\nSIGTERM with 24 requests in flight: {len(finished)} finished, {24 - len(finished)} answered 503")
