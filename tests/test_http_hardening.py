"""Hostile input on real sockets, on both transports: smuggling, versions, Host, error bodies.

Every request here is sent all at once and byte by byte; the point of each
test is what the server does *not* do (serve a hidden request, keep a
connection it should close, echo what it was sent).
"""

from __future__ import annotations

import h11
import pytest
import structlog
from server_apps import ConfigFactory, StandInApp
from test_server_wire import (
    GET,
    assert_new_client_served,
    exchange,
    parse_all,
    running,
)

from zerver.core._http import Request, Response
from zerver.http._connection import AcceptFailures, ConnectionContext, RejectedError, check_head
from zerver.http._server import ServerConfig

pytestmark = pytest.mark.anyio

HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture(params=["whole", "bytewise"])
def split(request: pytest.FixtureRequest) -> bool:
    """Whether the request under test is written one byte per write."""
    return bool(request.param == "bytewise")


def pieces(data: bytes, bytewise: bool) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))] if bytewise else [data]


async def refused(config: ServerConfig, request: bytes, bytewise: bool) -> tuple[int, bytes]:
    """Send ``request``; the single error reply's status and raw bytes (the server must close)."""
    app = StandInApp()
    with structlog.testing.capture_logs() as logs:
        async with running(app, config) as port:
            raw = await exchange(port, *pieces(request, bytewise))
            await assert_new_client_served(port)
    [reply] = parse_all(raw)
    assert reply.header("connection") == "close"
    assert [r.path for r in app.requests] == ["/echo"], "only the follow-up request is served"
    assert not any("smuggled" in str(event) for event in logs)
    return reply.status, raw


# ------------------------------------------------------------- smuggling


def cl_te(order: str) -> bytes:
    """A CL.TE / TE.CL request with :data:`HIDDEN` where one of the two framings puts it."""
    chunked = b"0\r\n\r\n" + HIDDEN
    te = b"Transfer-Encoding: chunked\r\n"
    cl = b"Content-Length: %d\r\n" % len(chunked)
    headers = cl + te if order == "cl-te" else te + cl
    return b"POST /echo HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n" + chunked


def te_cl() -> bytes:
    """Framed by Content-Length, the body ends early and :data:`HIDDEN` follows."""
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)
    return (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunk
    )


@pytest.mark.parametrize(
    "request_bytes",
    [
        cl_te("cl-te"),
        cl_te("te-cl"),
        te_cl(),
        cl_te("cl-te").replace(b"Transfer-Encoding: chunked", b"transfer-encoding: CHUNKED"),
        cl_te("cl-te").replace(b"Content-Length:", b"Content-Length: 0,"),
    ],
    ids=["cl-then-te", "te-then-cl", "te-cl-short", "te-case", "cl-list"],
)
async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    config: ConfigFactory, split: bool, request_bytes: bytes
) -> None:
    status, raw = await refused(config(), request_bytes, split)
    assert status == 400
    assert b"smuggled" not in raw


async def test_transfer_encoding_in_http_1_0_is_refused(config: ConfigFactory, split: bool) -> None:
    request = b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(HIDDEN),
        HIDDEN,
    )
    status, _raw = await refused(config(), request, split)
    assert status == 400


async def test_a_refused_request_ends_the_connection_even_when_pipelined(
    config: ConfigFactory,
) -> None:
    # A good request, the ambiguous one, and a third that must never be read.
    app = StandInApp()
    async with running(app, config()) as port:
        raw = await exchange(port, GET + cl_te("cl-te") + GET)
    replies = parse_all(raw)
    assert [r.status for r in replies] == [200, 400]
    assert [r.path for r in app.requests] == ["/echo"]


# --------------------------------------------------------------- versions


@pytest.mark.parametrize("version", [b"2.0", b"3.0", b"9.9", b"0.9"])
async def test_unsupported_http_versions_get_505_and_close(
    config: ConfigFactory, split: bool, version: bytes
) -> None:
    request = b"GET /echo HTTP/%s\r\nHost: t\r\n\r\n" % version + GET
    status, raw = await refused(config(), request, split)
    assert status == 505
    assert parse_all(raw)[0].json() == {"error": "http version not supported"}


@pytest.mark.parametrize(
    "request_line",
    [b"GET /echo HTTP/1.10", b"GET /echo HTTP/11", b"GET /echo HTTP/2", b"GET /echo HTTPS/1.1"],
)
async def test_request_lines_that_are_no_version_get_400(
    config: ConfigFactory, request_line: bytes
) -> None:
    status, _raw = await refused(config(), request_line + b"\r\nHost: t\r\n\r\n", False)
    assert status == 400


async def test_an_http_0_9_simple_request_gets_400(config: ConfigFactory) -> None:
    status, _raw = await refused(config(), b"GET /echo\r\n\r\n", False)
    assert status == 400


async def test_supported_versions_are_served(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        old = parse_all(await exchange(port, b"GET /echo HTTP/1.0\r\n\r\n"))
        current = parse_all(
            await exchange(port, GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        )
    assert [r.json()["http_version"] for r in old + current] == ["1.0", "1.1"]


# ------------------------------------------------------------------- Host


@pytest.mark.parametrize(
    "host",
    [
        b"exa mple.com",
        b"example.com/admin",
        b"admin:hunter2@example.com",
        b"user@example.com:80",
        b"example.com:80/x",
        b"example.com?x=1",
        b"example.com#x",
        b"[::1",
        b"example.com:8o",
        b"exa\\mple.com",
    ],
)
async def test_host_that_is_not_host_and_port_gets_400(
    config: ConfigFactory, split: bool, host: bytes
) -> None:
    request = b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\n\r\n" + GET
    status, raw = await refused(config(), request, split)
    assert status == 400
    assert parse_all(raw)[0].json() == {"error": "invalid host header"}
    assert host not in raw


@pytest.mark.parametrize(
    "host",
    [b"example.com", b"example.com:8080", b"127.0.0.1:1", b"[::1]:80", b"[v1.x]", b"a_b-c~d", b""],
)
async def test_valid_hosts_are_served(config: ConfigFactory, host: bytes) -> None:
    app = StandInApp()
    request = b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    async with running(app, config()) as port:
        [reply] = parse_all(await exchange(port, request))
    assert reply.status == 200
    headers = reply.json()["headers"]
    assert isinstance(headers, list)
    assert ["host", host.decode()] in headers


async def test_missing_or_repeated_host_in_http_1_1_gets_400(config: ConfigFactory) -> None:
    missing, _ = await refused(config(), b"GET /echo HTTP/1.1\r\n\r\n", False)
    twice, _ = await refused(config(), b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", False)
    assert (missing, twice) == (400, 400)


# -------------------------------------------------------------- error bodies


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"X-Token: s3cr3t-value\x00", 400),
        (b"Authorization: Bearer s3cr3t-value\x00", 400),
        (b"Authorization Bearer s3cr3t-value", 400),
        (b"Host: s3cr3t-value@h", 400),
        (b"Transfer-Encoding: s3cr3t-value", 501),
        (b"Content-Length: s3cr3t-value", 400),
        (b"s3cr3t-value x: y", 400),
    ],
)
async def test_error_bodies_never_echo_the_offending_input(
    config: ConfigFactory, header: bytes, status: int
) -> None:
    host = b"" if header.startswith(b"Host") else b"Host: t\r\n"
    request = b"POST /echo HTTP/1.1\r\n" + host + header + b"\r\n\r\n"
    got, raw = await refused(config(), request, False)
    assert got == status
    assert b"s3cr3t" not in raw
    assert set(parse_all(raw)[0].json()) == {"error"}


def test_check_head_refuses_before_the_app_sees_anything() -> None:
    # The same rules without sockets, including what h11 lets through.
    async def never(request: Request) -> Response:  # pragma: no cover - not called
        raise AssertionError

    ctx = ConnectionContext(
        never,
        max_header_bytes=16384,
        max_body_bytes=100,
        header_timeout_s=1,
        keepalive_timeout_s=1,
        max_pipelined=1024,
    )

    def status(version: bytes, headers: list[tuple[bytes, bytes]]) -> int | None:
        event = h11.Request(method=b"POST", target=b"/", headers=headers, http_version=version)
        try:
            check_head(ctx, event, list(event.headers))
        except RejectedError as reject:
            return reject.status
        return None

    host = (b"host", b"t")
    length = (b"content-length", b"3")
    chunked = (b"transfer-encoding", b"chunked")
    assert status(b"1.1", [host]) is None
    assert status(b"1.0", []) is None
    assert status(b"2.0", [host]) == 505
    assert status(b"1.1", [host, length, chunked]) == 400
    assert status(b"1.1", [host, chunked]) is None
    assert status(b"1.0", [chunked]) == 400
    assert status(b"1.1", [(b"host", b"a b")]) == 400


# ---------------------------------------------------------- accept failures


def test_accept_failures_are_logged_once_per_interval() -> None:
    now = [100.0]
    failures = AcceptFailures(10.0, clock=lambda: now[0])
    emfile = OSError(24, "Too many open files")
    with structlog.testing.capture_logs() as logs:
        for _ in range(500):
            failures.failed(emfile, 0.1)
            now[0] += 0.01  # 5 s of failures: one line
        assert failures.failing
        now[0] += 6.0
        failures.failed(emfile, 0.1)  # past the interval: the second line
        failures.succeeded()
    assert [(e["event"], e.get("failures")) for e in logs] == [
        ("accept failed; backing off", 1),
        ("accept failed; backing off", 500),
        ("accepting connections again", 501),
    ]
    assert logs[0]["errno"] == 24
    assert not failures.failing
