"""Malformed requests, generated, against a real server on each transport.

Two families: valid requests mutated byte-wise (inserted, deleted and
replaced bytes from a set that matters to HTTP parsers), and requests whose
framing is built to be read two ways (``Content-Length`` with an obfuscated
``Transfer-Encoding``), carrying a hidden request that only a wrong framing
would serve. Each is written in random pieces and followed by an ordinary
closing request. Whatever happens, the answers are 4xx (or 501/505) or a
close, never a 500; the hidden request is never served; and the server goes
on serving.

Hypothesis drives blocking sockets from a worker thread while the server
runs on the test's event loop; examples are derandomized and bounded.
"""

from __future__ import annotations

import functools
import itertools
import socket

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_apps import TRANSPORTS, WAIT_S, StandInApp
from test_server_wire import parse_all, running

from zerver.http._server import ServerConfig, Transport

pytestmark = pytest.mark.anyio

EXAMPLES = 150
HIDDEN_PATH = b"/smuggled"
HIDDEN = b"GET " + HIDDEN_PATH + b" HTTP/1.1\r\nHost: t\r\n\r\n"
CLOSING = b"GET /after HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
# Statuses a refusal may carry; 200 when a mutation happened to stay valid.
ALLOWED = {200, 400, 404, 405, 408, 413, 417, 431, 501, 505}

VALID = [
    b"GET /echo?a=1 HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /echo HTTP/1.0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t:80\r\n\r\n",
]
INTERESTING = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"\x7f",
    b"\xff",
    b"0",
    b"9",
    b"-",
    b"@",
    b"/",
    b",",
    b";",
    b"HTTP/2.0",
    b"Content-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Host: a\r\n",
    b"Expect: 100-continue\r\n",
    b"\r\n\r\n",
    HIDDEN,
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(INTERESTING))
        if kind == "insert":
            data[at:at] = piece
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            data[at : at + len(piece)] = piece
    # Only the hidden request of the framing family may not be served.
    return bytes(data).replace(HIDDEN_PATH, b"/hidden")


TE_NAMES = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING", b"Transfer-Encoding "]
TE_VALUES = [
    b"chunked",
    b"CHUNKED",
    b"chunked ",
    b" chunked",
    b"\tchunked",
    b"chunked, chunked",
    b"identity, chunked",
    b"gzip, chunked",
    b"chunked;q=1",
    b"x",
]
CL_FORMS = [b"%d", b"0%d", b"+%d", b"%d, %d", b"%d,%d", b" %d ", b"-%d"]


@st.composite
def ambiguous(draw: st.DrawFn) -> bytes:
    """A request framed both ways, with :data:`HIDDEN` where one framing would serve it."""
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    te = draw(st.sampled_from(TE_NAMES)) + b": " + draw(st.sampled_from(TE_VALUES)) + b"\r\n"
    if draw(st.booleans()):
        # CL.TE: Content-Length covers everything; chunked ends at "0" and serves HIDDEN.
        body = b"0\r\n\r\n" + HIDDEN
        length = len(body)
    else:
        # TE.CL: chunked covers everything; a 4-byte Content-Length serves HIDDEN.
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)
        length = 4
    form = draw(st.sampled_from(CL_FORMS))
    cl = b"Content-Length: " + form.replace(b"%d", b"%d" % length) + b"\r\n"
    framing = [te, cl] if draw(st.booleans()) else [cl, te]
    if draw(st.booleans()):
        framing.append(draw(st.sampled_from([te, cl])))
    head = b"POST /echo HTTP/%s\r\nHost: t\r\n%s\r\n" % (version, b"".join(framing))
    return head + body


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def talk(port: int, pieces: list[bytes]) -> bytes:
    """Write ``pieces`` one per send and read until the server closes (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        data = b""
        try:
            for piece in pieces:
                sock.sendall(piece)
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server refused and closed while we were still writing
        return data


def check_example(app: StandInApp, port: int, request: bytes, points: list[int]) -> None:
    raw = talk(port, [*cut(request, points), CLOSING])
    replies = parse_all(raw)
    statuses = [r.status for r in replies]
    assert all(s in ALLOWED for s in statuses), (request, statuses, raw)
    # A refusal is the last answer on its connection.
    for reply in replies[:-1]:
        assert reply.status < 400, (request, statuses)
    if replies and replies[-1].status >= 400:
        assert replies[-1].header("connection") == "close"
    served = [r.json()["path"] for r in replies if r.status == 200]
    assert HIDDEN_PATH.decode() not in served, (request, raw)
    assert all(r.path != HIDDEN_PATH.decode() for r in app.requests), request
    [after] = parse_all(talk(port, [CLOSING]))
    assert after.status == 200, request


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_malformed_requests_never_get_500_nor_smuggle(transport: Transport) -> None:
    app = StandInApp()
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        transport=transport,
        header_timeout_s=0.25,
        body_timeout_s=0.25,
        keepalive_timeout_s=0.25,
        max_header_bytes=4096,
        max_body_bytes=4096,
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        request=st.one_of(mutated(), ambiguous()),
        points=st.lists(st.integers(0, 10_000), max_size=4),
    )
    def fuzz(request: bytes, points: list[int]) -> None:
        check_example(app, port, request, points)

    async with running(app, config) as port:
        await anyio.to_thread.run_sync(functools.partial(fuzz))
