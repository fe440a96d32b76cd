"""HttpInterpreter against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import orjson
import pytest
from anyio import wait_all_tasks_blocked

from zerver.core._clock import MonotonicClock
from zerver.core._effects import (
    CacheGet,
    Effect,
    HttpDelete,
    HttpGet,
    HttpPost,
    HttpPut,
    HttpResult,
)
from zerver.core._errors import EffectError
from zerver.runtime._park import JobContext
from zerver.runtime.interpreters import HttpInterpreter
from zerver.trace._records import JobState

pytestmark = pytest.mark.anyio

# Upper bound on how long the slow endpoint holds a request open.
SLOW_MAX_S = 5.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Server(ThreadingHTTPServer):
    daemon_threads = True
    release: threading.Event

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is expected here, not a failure.
        pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self._send(
            200,
            orjson.dumps(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "header_list": [[k.lower(), v] for k, v in self.headers.items()],
                    "body": body.decode(),
                }
            ),
        )

    def do_GET(self) -> None:
        if self.path == "/json":
            self._send(200, b'{"ok": true, "n": 1}')
        elif self.path == "/missing":
            self._send(404, b"no such thing", "text/plain")
        elif self.path.startswith("/unavailable"):
            self._send(503, b"try later", "text/plain")
        elif self.path == "/slow":
            self.close_connection = True
            self.server.release.wait(SLOW_MAX_S)
            with contextlib.suppress(OSError):  # the client gave up
                self._send(200, b"{}")
        elif self.path == "/big":
            self._send(200, b"x" * 4096, "text/plain")
        else:
            self._echo()

    def do_POST(self) -> None:
        self._echo()

    def do_PUT(self) -> None:
        self._echo()

    def do_DELETE(self) -> None:
        self._echo()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.release = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(SLOW_MAX_S)


@pytest.fixture
def base(server: Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


@pytest.fixture
async def http() -> AsyncIterator[HttpInterpreter]:
    interp = HttpInterpreter(trust_env=False)
    await interp.start()
    try:
        yield interp
    finally:
        await interp.aclose()


def make_job(effect: Effect) -> JobContext:
    state = JobState(
        index=0, kind="effect", name=effect.span_name, queue="effects", step_index=0, effect=effect
    )
    return JobContext(state, MonotonicClock())


async def perform(interp: HttpInterpreter, effect: Effect) -> tuple[HttpResult, JobState]:
    job = make_job(effect)
    result = await interp.perform(effect, job)
    assert isinstance(result, HttpResult)
    return result, job.state


async def fail(interp: HttpInterpreter, effect: Effect) -> tuple[EffectError, JobState]:
    job = make_job(effect)
    with pytest.raises(EffectError) as info:
        await interp.perform(effect, job)
    return info.value, job.state


def assert_io_wait(state: JobState) -> None:
    [episode] = state.park_episodes
    assert episode.cause == "io_wait"
    assert episode.token == "http"
    assert episode.resume_ts is not None
    assert episode.resume_ts >= episode.park_ts


async def test_get_json(http: HttpInterpreter, base: str) -> None:
    result, state = await perform(http, HttpGet(url=f"{base}/json"))
    assert result.status == 200
    assert result.json() == {"ok": True, "n": 1}
    assert ("content-type", "application/json") in result.headers
    assert state.result_meta == {
        "http.response.status_code": 200,
        "http.response.body.size": len(result.body),
    }
    assert_io_wait(state)


async def test_404_is_a_result(http: HttpInterpreter, base: str) -> None:
    result, state = await perform(http, HttpGet(url=f"{base}/missing"))
    assert result.status == 404
    assert result.body == b"no such thing"
    assert state.result_meta is not None
    assert state.result_meta["http.response.status_code"] == 404


async def test_5xx_is_a_retryable_error(http: HttpInterpreter, base: str) -> None:
    error, state = await fail(http, HttpGet(url=f"{base}/unavailable"))
    assert error.kind == "http_5xx"
    assert error.status_hint == 502
    assert error.retryable is True
    assert "503" in str(error)
    assert f"GET {base}/unavailable" in str(error)
    assert state.result_meta is not None
    assert state.result_meta["http.response.status_code"] == 503
    assert_io_wait(state)


async def test_error_messages_hide_credentials(http: HttpInterpreter, server: Server) -> None:
    port = server.server_address[1]
    url = f"http://user:s3cret@127.0.0.1:{port}/unavailable?token=abc123"
    error, _ = await fail(http, HttpGet(url=url))
    assert error.kind == "http_5xx"
    assert f"127.0.0.1:{port}/unavailable" in str(error)
    assert "s3cret" not in str(error)
    assert "abc123" not in str(error)


async def test_timeout(http: HttpInterpreter, base: str) -> None:
    started = time.monotonic()
    error, state = await fail(http, HttpGet(url=f"{base}/slow", timeout_ms=50))
    assert time.monotonic() - started < SLOW_MAX_S / 2
    assert error.kind == "timeout"
    assert error.status_hint == 504
    assert error.retryable is True
    assert "/slow" in str(error)
    assert state.result_meta is None
    assert_io_wait(state)


async def test_connection_refused(http: HttpInterpreter) -> None:
    # A bound socket that does not listen refuses connections and keeps the port ours.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        error, state = await fail(http, HttpGet(url=f"http://127.0.0.1:{port}/x"))
    assert error.kind == "connect_error"
    assert error.status_hint == 502
    assert error.retryable is True
    assert f"127.0.0.1:{port}/x" in str(error)
    assert_io_wait(state)


async def test_post_json_put_body_delete(http: HttpInterpreter, base: str) -> None:
    result, _ = await perform(http, HttpPost(url=f"{base}/items", json={"name": "ünï", "n": [1]}))
    echo = result.json()
    assert echo["method"] == "POST"
    assert echo["headers"]["content-type"] == "application/json"
    assert orjson.loads(echo["body"]) == {"name": "ünï", "n": [1]}

    result, _ = await perform(
        http,
        HttpPut(url=f"{base}/items/1", body=b"raw", headers=(("content-type", "text/plain"),)),
    )
    echo = result.json()
    assert (echo["method"], echo["body"], echo["headers"]["content-type"]) == (
        "PUT",
        "raw",
        "text/plain",
    )

    # An explicit content-type wins over the JSON default.
    result, _ = await perform(
        http,
        HttpPost(
            url=f"{base}/items", json=[1], headers=(("Content-Type", "application/vnd.x+json"),)
        ),
    )
    assert result.json()["headers"]["content-type"] == "application/vnd.x+json"

    result, _ = await perform(http, HttpDelete(url=f"{base}/items/1"))
    assert result.json()["method"] == "DELETE"


async def test_headers_hook_and_effect_headers(base: str) -> None:
    seen: list[Effect] = []

    def hook(effect: Effect, job: JobContext) -> list[tuple[str, str]]:
        seen.append(effect)
        return [("traceparent", f"00-{'1' * 32}-{'2' * 16}-01")]

    interp = HttpInterpreter(headers_hook=hook, trust_env=False)
    effect = HttpGet(url=f"{base}/echo", headers=(("x-request-id", "r-1"),))
    try:
        result, _ = await perform(interp, effect)
    finally:
        await interp.aclose()
    headers = result.json()["headers"]
    assert headers["traceparent"] == f"00-{'1' * 32}-{'2' * 16}-01"
    assert headers["x-request-id"] == "r-1"
    assert seen == [effect]


async def test_propagation_replaces_the_effects_own_trace_headers(base: str) -> None:
    """An effect that sets ``traceparent`` / ``tracestate`` itself does not send two of
    each (the receiver would then start a new trace): zerver's, naming the effect's
    span as the parent, replace them; other headers go as given."""
    from zerver.trace._records import RequestRecord

    interp = HttpInterpreter(trust_env=False)
    stale = f"00-{'a' * 32}-{'b' * 16}-01"
    effect = HttpGet(
        url=f"{base}/echo",
        headers=(("TraceParent", stale), ("tracestate", "k=v"), ("x-request-id", "r-1")),
    )
    record = RequestRecord(MonotonicClock())
    record.start_trace()
    state = JobState(
        index=0, kind="effect", name=effect.span_name, queue="effects", step_index=0, effect=effect
    )
    state.span_id = record.new_span_id()
    job = JobContext(state, MonotonicClock(), record)
    try:
        result = await interp.perform(effect, job)
    finally:
        await interp.aclose()
    sent = result.json()["header_list"]
    parents = [v for k, v in sent if k == "traceparent"]
    assert parents == [f"00-{record.trace_id:032x}-{state.span_id:016x}-01"]
    assert [k for k, _ in sent].count("tracestate") <= 1
    assert ["x-request-id", "r-1"] in sent


async def test_invalid_requests(http: HttpInterpreter, base: str) -> None:
    error, state = await fail(http, HttpPost(url=f"{base}/x", body=b"a", json={"a": 1}))
    assert (error.kind, error.retryable) == ("invalid_request", False)
    assert state.park_episodes == []

    error, _ = await fail(http, HttpPost(url=f"{base}/x", json={"a": object()}))
    assert error.kind == "invalid_request"

    error, _ = await fail(http, HttpGet(url="ftp://127.0.0.1/file"))
    assert (error.kind, error.status_hint, error.retryable) == ("invalid_url", 500, False)

    error, _ = await fail(http, CacheGet(namespace="n", key="k"))
    assert error.kind == "unsupported_effect"


async def test_response_size_is_bounded(base: str) -> None:
    interp = HttpInterpreter(max_response_bytes=1024, trust_env=False)
    try:
        error, _ = await fail(interp, HttpGet(url=f"{base}/big"))
        result, _ = await perform(interp, HttpGet(url=f"{base}/json"))
    finally:
        await interp.aclose()
    assert error.kind == "response_too_large"
    assert "1024" in str(error)
    assert result.status == 200


async def test_connection_limit_parks_with_backpressure(server: Server, base: str) -> None:
    interp = HttpInterpreter(max_connections=1, trust_env=False)
    slow, fast = make_job(HttpGet(url=f"{base}/slow")), make_job(HttpGet(url=f"{base}/json"))

    async def go(job: JobContext) -> None:
        assert job.state.effect is not None
        await interp.perform(job.state.effect, job)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(go, slow)
            await wait_all_tasks_blocked()
            tg.start_soon(go, fast)
            await wait_all_tasks_blocked()
            assert interp.limiter.waiting == 1
            server.release.set()
    finally:
        await interp.aclose()
    assert [e.cause for e in slow.state.park_episodes] == ["io_wait"]
    backpressure, io_wait = fast.state.park_episodes
    assert (backpressure.cause, backpressure.token) == ("backpressure", "http_pool")
    assert backpressure.limit_current == backpressure.limit_max == 1
    assert backpressure.resume_ts is not None
    assert io_wait.cause == "io_wait"
    assert io_wait.park_ts >= backpressure.resume_ts
