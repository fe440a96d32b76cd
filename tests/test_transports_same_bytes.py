"""Both transports answer the same bytes with the same bytes, on asyncio and on trio.

The asyncio ``Protocol`` transport is the reference; the anyio-streams
transport runs on asyncio and on trio (it is the one that can). Each case is
a byte stream written over a real socket on 127.0.0.1 (good, pipelined,
malformed, oversized, HTTP/1.0, ``Expect``, chunked, a timeout); the
responses, read until the server closes, must be equal byte for byte once
the ``date`` header is normalised. Every case ends with the server closing
(a last ``connection: close``, an HTTP/1.0 request, a refusal or a timeout),
never with the client's EOF, which would race the dispatch of its request.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio
import anyio.from_thread
import orjson
import pytest

from zerver.core._http import Request, Response
from zerver.http._server import ServerConfig, Transport, serve

WAIT_S = 10.0  # every read is bounded; none is expected to come close
HEADER_TIMEOUT_S = 1.0
BIG = b"0123456789abcdef" * 8192  # 128 KiB: written in slices by the streams transport
_DATE = re.compile(rb"\r\ndate: [^\r]*\r\n")


class SameBytesApp:
    """Answers by path, the same way on every transport (no addresses, no random ids)."""

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        yield

    async def dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/status/"):
            return Response(int(path.removeprefix("/status/")), b"")
        if path == "/app-close":
            return Response.text("bye", headers=[("Connection", "close")])
        if path == "/big":
            return Response(200, BIG, [("content-type", "application/octet-stream")])
        return Response.json(
            {
                "method": request.method,
                "path": path,
                "query": request.query,
                "body": request.body.decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
                "http_version": request.http_version,
            }
        )


@dataclass(frozen=True)
class Await:
    """A step of a case: read until the server has sent ``marker``."""

    marker: bytes


Step = bytes | Await

GET = b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"
GET_CLOSE = b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
PIPELINE = (
    GET
    + b"POST /form?a=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
    + b"PUT /chunks HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    + b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n"
    + b"GET /status/204 HTTP/1.1\r\nHost: t\r\n\r\n"
    + GET_CLOSE
)

# name -> (steps, the statuses the reference answers, in order)
CASES: dict[str, tuple[list[Step], list[int]]] = {
    "one-request": ([GET_CLOSE], [200]),
    "keep-alive": ([GET, Await(b"}"), GET_CLOSE], [200, 200]),
    "pipelined": ([PIPELINE], [200, 200, 200, 200, 204, 200]),
    "pipelined-byte-by-byte": (
        [PIPELINE[i : i + 1] for i in range(len(PIPELINE))],
        [200] * 4 + [204, 200],
    ),
    "big-response": ([b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"], [200]),
    "app-close": ([b"GET /app-close HTTP/1.1\r\nHost: t\r\n\r\n" + GET], [200]),
    "http-1.0": ([b"GET /old HTTP/1.0\r\n\r\n" + GET], [200]),
    "http-1.0-body": ([b"POST /old HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi"], [200]),
    "expect-100-continue": (
        [
            b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n",
            Await(b"100 Continue\r\n\r\n"),
            b"body",
        ],
        [100, 200],
    ),
    "expect-unknown": ([b"GET / HTTP/1.1\r\nHost: t\r\nExpect: magic\r\n\r\n"], [417]),
    "chunked-with-extension-and-trailer": (
        [
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
            b"4;ext=1\r\nwiki\r\n0\r\nX-Trailer: t\r\n\r\n"
        ],
        [200],
    ),
    "malformed": ([b"GARBAGE\r\n\r\n"], [400]),
    "malformed-after-a-good-one": ([GET + b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"], [200, 400]),
    "header-too-large": ([b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 2048 + b"\r\n\r\n"], [431]),
    "header-too-large-incomplete": ([b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 4096], [431]),
    "body-too-large": ([b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"], [413]),
    "chunked-body-too-large": (
        [b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"a" * 1024],
        [413],
    ),
    "unknown-transfer-coding": (
        [b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"],
        [501],
    ),
    "ambiguous-framing": (
        [b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"],
        [400],
    ),
    "http-version": ([b"GET / HTTP/1.2\r\nHost: t\r\n\r\n"], [505]),
    "bad-host": ([b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"], [400]),
    "bad-target": ([b"GET nope HTTP/1.1\r\nHost: t\r\n\r\n"], [400]),
    "absolute-and-asterisk-form": (
        [
            b"GET http://t/abs?q HTTP/1.1\r\nHost: t\r\n\r\n"
            b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        ],
        [200, 200],
    ),
    "head-timeout": ([b"GET / HTTP/1.1\r\nHo"], [408]),
}


def normalised(data: bytes) -> bytes:
    return _DATE.sub(b"\r\ndate: <date>\r\n", data)


def statuses(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def exchange(port: int, steps: list[Step]) -> bytes:
    """Play ``steps`` on one connection; everything read until the server closes."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        for step in steps:
            if isinstance(step, bytes):
                sock.sendall(step)
                continue
            while step.marker not in received:
                chunk = sock.recv(65536)
                assert chunk, f"the server closed before sending {step.marker!r}"
                received += chunk
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


@dataclass(frozen=True)
class Server:
    name: str
    port: int


@contextlib.contextmanager
def serving(transport: Transport, backend: str) -> Iterator[Server]:
    """Serve :class:`SameBytesApp` on ``transport`` in an event loop of its own thread."""
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        transport=transport,
        max_header_bytes=1024,
        max_body_bytes=1000,
        header_timeout_s=HEADER_TIMEOUT_S,
        keepalive_timeout_s=WAIT_S,
        shutdown_timeout_s=1.0,
    )
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        shutdown = portal.call(anyio.Event)
        future, port = portal.start_task(
            functools.partial(serve, SameBytesApp(), config, shutdown=shutdown)
        )
        try:
            yield Server(f"{transport} on {backend}", port)
        finally:
            portal.call(shutdown.set)
            future.result(timeout=WAIT_S)


def _trio_available() -> bool:
    try:
        import trio  # noqa: F401
    except ImportError:  # pragma: no cover - trio is in the test extras
        return False
    return True


@pytest.fixture(scope="module")
def reference() -> Iterator[Server]:
    with serving("protocol", "asyncio") as server:
        yield server


@pytest.fixture(
    scope="module",
    params=[
        ("streams", "asyncio"),
        pytest.param(
            ("streams", "trio"),
            marks=pytest.mark.skipif(not _trio_available(), reason="trio is not installed"),
        ),
    ],
    ids=["streams-asyncio", "streams-trio"],
)
def other(request: pytest.FixtureRequest) -> Iterator[Server]:
    transport, backend = request.param
    with serving(transport, backend) as server:
        yield server


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_bytes_get_the_same_answer(reference: Server, other: Server, case: str) -> None:
    steps, expected = CASES[case]
    want = normalised(exchange(reference.port, steps))
    assert statuses(want) == expected, want[:300]
    got = normalised(exchange(other.port, steps))
    assert got == want, f"{other.name} differs from {reference.name}"


def test_error_bodies_name_the_rule(reference: Server) -> None:
    data = exchange(reference.port, CASES["body-too-large"][0])
    body = orjson.loads(data.partition(b"\r\n\r\n")[2])
    assert body == {"error": "request body too large", "limit": 1000}
