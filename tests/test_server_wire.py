"""The HTTP/1.1 server on real sockets: framing, keep-alive, pipelining, limits, timeouts.

Raw sockets write exactly the bytes under test; ``http.client`` is the
reference implementation both as a client and as the parser of raw replies.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import socket
from collections.abc import AsyncIterator, Sequence
from typing import cast

import anyio
import anyio.abc
import pytest
import structlog
from server_apps import (
    TRANSPORTS,
    WAIT_S,
    ConfigFactory,
    Reply,
    StandInApp,
    http_client_requests,
    read_until_eof,
)

from zerver.core._errors import ConfigError
from zerver.http._connection import split_target
from zerver.http._server import ServerConfig, _use_protocol, serve

pytestmark = pytest.mark.anyio


# The same wire tests on both transports (the ``config`` fixture) and, for the streams
# transport, on both of anyio's backends: the Protocol transport exists only on asyncio.
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return cast(str, request.param)


@pytest.fixture(params=TRANSPORTS)
def config(request: pytest.FixtureRequest, anyio_backend: str) -> ConfigFactory:
    if anyio_backend == "trio" and request.param == "protocol":
        pytest.skip("the Protocol transport runs on asyncio only")
    return functools.partial(ServerConfig, host="127.0.0.1", port=0, transport=request.param)


GET = b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"


# ------------------------------------------------------------------ helpers


@contextlib.asynccontextmanager
async def running(app: StandInApp, config: ServerConfig) -> AsyncIterator[int]:
    """Serve ``app`` for the duration of the block; yields the port."""
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(functools.partial(serve, app, config, shutdown=shutdown))
        try:
            yield port
        finally:
            shutdown.set()


async def exchange(port: int, *chunks: bytes) -> bytes:
    """Send ``chunks`` one write each and return everything read until the server closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        for chunk in chunks:
            await stream.send(chunk)
        return await read_until_eof(stream)


async def read_response(stream: anyio.abc.ByteStream, buffer: bytearray) -> Reply:
    """Read exactly one response off a kept-alive connection."""
    with anyio.fail_after(WAIT_S):
        while True:
            replies, used = parse_prefix(bytes(buffer))
            if replies:
                del buffer[:used]
                return replies[0]
            buffer += await stream.receive()


class _Unclosable(io.BytesIO):
    # http.client closes its file at the end of each response; several
    # responses are parsed from one buffer.
    def close(self) -> None:
        pass


class _FakeSocket:
    def __init__(self, fp: io.BytesIO) -> None:
        self._fp = fp

    def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
        return self._fp


def parse_prefix(data: bytes, methods: Sequence[str] = ()) -> tuple[list[Reply], int]:
    """Complete responses at the start of ``data`` (parsed by http.client) and bytes used."""
    fp = _Unclosable(data)
    replies: list[Reply] = []
    used = 0
    while b"\r\n\r\n" in data[used:]:
        method = methods[len(replies)] if len(replies) < len(methods) else "GET"
        sock = cast(socket.socket, _FakeSocket(fp))
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
            body = response.read()
        except http.client.HTTPException:
            break
        headers = [(k.lower(), v) for k, v in response.getheaders()]
        replies.append(Reply(response.status, headers, body))
        used = fp.tell()
    return replies, used


def parse_all(data: bytes, methods: Sequence[str] = ()) -> list[Reply]:
    """All responses in ``data``; fails on trailing bytes that are not a response."""
    replies, used = parse_prefix(data, methods)
    assert used == len(data), f"unparsed bytes after {len(replies)} responses: {data[used:]!r}"
    return replies


def assert_served(reply: Reply) -> None:
    assert reply.status == 200, reply
    assert reply.header("content-length") == str(len(reply.body))


async def assert_new_client_served(port: int) -> None:
    replies = parse_all(
        await exchange(port, GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    )
    assert [r.status for r in replies] == [200]


# ------------------------------------------------------------ framing basics


async def test_keep_alive_serves_several_requests_on_one_connection(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        requests = [
            ("GET", "/echo?n=1", None),
            ("POST", "/echo?n=2", b"abc"),
            ("GET", "/echo?n=3", None),
        ]
        replies = await anyio.to_thread.run_sync(http_client_requests, port, requests)
    assert [r.status for r in replies] == [200, 200, 200]
    echoes = [r.json() for r in replies]
    assert [e["query"] for e in echoes] == ["n=1", "n=2", "n=3"]
    assert echoes[1]["body"] == "abc"
    clients = {str(e["client"]) for e in echoes}
    assert len(clients) == 1, "all three requests must share one connection"
    assert all(r.header("date") for r in replies)


async def test_request_carries_connection_facts(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET /echo/a%20b?x=1&y=2 HTTP/1.1\r\nHost: t\r\nX-Thing: V\r\n\r\n")
        reply = await read_response(stream, bytearray())
        local_port = stream.extra(anyio.abc.SocketAttribute.local_port)
    echo = reply.json()
    assert echo == {
        "method": "GET",
        "path": "/echo/a%20b",
        "query": "x=1&y=2",
        "body": "",
        "headers": [["host", "t"], ["x-thing", "V"]],
        "http_version": "1.1",
        "scheme": "http",
        "client": ["127.0.0.1", local_port],
        "server": ["127.0.0.1", port],
    }


async def test_pipelined_requests_are_answered_in_order(config: ConfigFactory) -> None:
    app = StandInApp()
    burst = (
        b"GET /echo?i=1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /echo?i=2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /echo?i=3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, burst))
    assert [r.status for r in replies] == [200, 200, 200]
    assert [r.json()["query"] for r in replies] == ["i=1", "i=2", "i=3"]
    assert replies[1].json()["body"] == "hello"
    assert replies[2].header("connection") == "close"


async def test_upgrade_requests_get_an_ordinary_response_and_keep_alive(
    config: ConfigFactory,
) -> None:
    # The server does not switch protocols; h11 must return to keep-alive.
    app = StandInApp()
    burst = (
        b"GET /echo?i=1 HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /echo?i=2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, burst))
    assert [r.json()["query"] for r in replies] == ["i=1", "i=2"]


async def test_pipelining_beyond_the_read_ahead_budget(config: ConfigFactory) -> None:
    # A tiny budget makes the reader park and resume many times.
    app = StandInApp()
    count = 40
    burst = b"".join(b"GET /echo?i=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(count))
    burst += b"GET /echo?i=last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    async with running(app, config(max_pipelined=64)) as port:
        replies = parse_all(await exchange(port, burst))
    expected = [f"i={i}" for i in range(count)] + ["i=last"]
    assert [r.json()["query"] for r in replies] == expected


@pytest.mark.parametrize("piece", [1, 7, 64])
async def test_request_fed_in_pieces(config: ConfigFactory, piece: int) -> None:
    app = StandInApp()
    request = (
        b"POST /echo?q=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world"
        b"GET /echo?q=2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    pieces = [request[i : i + piece] for i in range(0, len(request), piece)]
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, *pieces))
    assert [r.json()["query"] for r in replies] == ["q=1", "q=2"]
    assert replies[0].json()["body"] == "hello world"


async def test_trailing_garbage_after_a_request_gets_400_and_close(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, GET + b"\x00\x01garbage\r\n\r\n"))
        await assert_new_client_served(port)
    assert [r.status for r in replies] == [200, 400]
    assert replies[1].json()["error"] == "malformed request"
    assert replies[1].header("connection") == "close"


async def test_chunked_request_body(config: ConfigFactory) -> None:
    app = StandInApp()
    head = (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    async with running(app, config()) as port:
        replies = parse_all(
            await exchange(port, head, b"5\r\nhello\r\n", b"6\r\n world\r\n0\r\n\r\n")
        )
    assert replies[0].json()["body"] == "hello world"


async def test_content_length_body_via_reference_client(config: ConfigFactory) -> None:
    app = StandInApp()
    body = bytes(range(256)) * 40
    async with running(app, config()) as port:
        replies = await anyio.to_thread.run_sync(
            http_client_requests, port, [("PUT", "/echo", body)]
        )
    assert replies[0].json()["body"] == body.decode("latin-1")
    assert len(app.requests[0].body) == len(body)


async def test_http_1_0_request_is_answered_then_closed(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, b"GET /echo HTTP/1.0\r\n\r\n"))
    assert replies[0].status == 200
    assert replies[0].json()["http_version"] == "1.0"


async def test_head_response_has_length_but_no_body(config: ConfigFactory) -> None:
    app = StandInApp()
    request = (
        b"HEAD /pid HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    async with running(app, config()) as port:
        head, get = parse_all(await exchange(port, request), methods=["HEAD", "GET"])
    assert (head.status, head.body) == (200, b"")
    assert head.header("content-length") == str(len(get.body))
    assert get.body


async def test_response_framing_is_the_servers(config: ConfigFactory) -> None:
    app = StandInApp()
    request = (
        b"GET /lying-length HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /status/304 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    async with running(app, config()) as port:
        lying, no_content, not_modified = parse_all(await exchange(port, request))
    assert lying.body == b"abc"
    assert lying.header("content-length") == "3"
    assert lying.header("x-kept") == "yes"
    assert no_content.status == 204
    assert no_content.header("content-length") is None
    assert not_modified.status == 304


async def test_target_forms(config: ConfigFactory) -> None:
    assert split_target(b"GET", b"/a/b?c=d") == ("/a/b", "c=d")
    assert split_target(b"GET", b"http://example.com:8080/x/y?z=1") == ("/x/y", "z=1")
    assert split_target(b"GET", b"HTTP://example.com") == ("/", "")
    assert split_target(b"OPTIONS", b"*") == ("*", "")
    assert split_target(b"GET", b"*") is None
    assert split_target(b"CONNECT", b"example.com:443") is None
    assert split_target(b"GET", b"http:///nohost") is None
    app = StandInApp()
    async with running(app, config()) as port:
        absolute = parse_all(
            await exchange(
                port, b"GET http://t/abs?q=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
        )
        invalid = parse_all(await exchange(port, b"GET nope HTTP/1.1\r\nHost: t\r\n\r\n"))
    assert absolute[0].json()["path"] == "/abs"
    assert invalid[0].status == 400
    assert invalid[0].json() == {"error": "invalid request target"}


# ------------------------------------------------------------------- limits


async def test_malformed_request_gets_400_then_close(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, b"NOT HTTP AT ALL\r\n\r\n"))
        missing_host = parse_all(await exchange(port, b"GET / HTTP/1.1\r\n\r\n"))
        await assert_new_client_served(port)
    assert replies[0].status == 400
    assert replies[0].header("content-type") == "application/json"
    assert missing_host[0].status == 400
    assert app.requests and all(r.path == "/echo" for r in app.requests)


@pytest.mark.parametrize("complete", [False, True], ids=["incomplete", "complete"])
async def test_oversized_header_block_gets_431(config: ConfigFactory, complete: bool) -> None:
    app = StandInApp()
    head = b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 3000 + b"\r\n"
    if complete:
        head += b"\r\n"
    async with running(app, config(max_header_bytes=2048)) as port:
        replies = parse_all(await exchange(port, head))
        await assert_new_client_served(port)
    assert replies[0].status == 431
    assert replies[0].json()["error"] == "request header block too large"


async def test_body_over_limit_by_content_length_gets_413_before_the_body(
    config: ConfigFactory,
) -> None:
    app = StandInApp()
    async with running(app, config(max_body_bytes=1000)) as port:
        replies = parse_all(
            await exchange(port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n")
        )
        fits = await anyio.to_thread.run_sync(
            http_client_requests, port, [("POST", "/echo", b"x" * 1000)]
        )
        await assert_new_client_served(port)
    assert replies[0].status == 413
    assert replies[0].json() == {"error": "request body too large", "limit": 1000}
    assert fits[0].status == 200


async def test_chunked_body_over_limit_gets_413(config: ConfigFactory) -> None:
    app = StandInApp()
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"190\r\n" + b"x" * 400 + b"\r\n"  # 400 bytes per chunk
    async with running(app, config(max_body_bytes=1000)) as port:
        replies = parse_all(await exchange(port, head, chunk, chunk, chunk, b"0\r\n\r\n"))
        await assert_new_client_served(port)
    assert replies[0].status == 413
    assert not any(r.method == "POST" for r in app.requests)


async def test_huge_content_length_is_refused(config: ConfigFactory) -> None:
    app = StandInApp()
    request = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\n"
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, request))
    assert replies[0].status == 413


async def test_expect_100_continue_and_unknown_expectations(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            with anyio.fail_after(WAIT_S):
                interim = await stream.receive()
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send(b"body")
            final = parse_all(await read_until_eof(stream))
        refused = parse_all(
            await exchange(
                port,
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: magic\r\n\r\n",
            )
        )
    assert final[0].json()["body"] == "body"
    assert refused[0].status == 417


async def test_unsupported_transfer_coding_gets_501(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        replies = parse_all(
            await exchange(
                port, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"
            )
        )
    assert replies[0].status == 501


# ------------------------------------------------------------- app failures


async def test_raising_app_gets_500_with_error_id_and_connection_survives(
    config: ConfigFactory,
) -> None:
    app = StandInApp()
    async with running(app, config()) as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
        buffer = bytearray()
        with structlog.testing.capture_logs() as logs:
            await stream.send(b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
            failed = await read_response(stream, buffer)
        await stream.send(GET)
        after = await read_response(stream, buffer)
    assert failed.status == 500
    body = failed.json()
    assert isinstance(body, dict)
    assert body["error"] == "internal server error"
    error_logs = [e for e in logs if e.get("error_id") == body["error_id"]]
    assert error_logs and error_logs[0]["log_level"] == "error"
    assert error_logs[0]["exc_info"] is True
    assert after.status == 200


async def test_unsendable_response_becomes_500(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        replies = parse_all(
            await exchange(
                port, b"GET /bad-status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
        )
    assert replies[0].status == 500
    assert "error_id" in replies[0].json()


async def test_headers_that_cannot_be_sent_become_500(config: ConfigFactory) -> None:
    app = StandInApp()
    request = (
        b"GET /bad-header-name HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /bad-header-value HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    async with running(app, config()) as port:
        replies = parse_all(await exchange(port, request))
    assert [r.status for r in replies] == [500, 500]
    assert all("error_id" in r.json() for r in replies)
    assert all(r.header("x-injected") is None and r.header("set-cookie") is None for r in replies)


async def test_connection_close_from_app_or_client_closes_after_the_response(
    config: ConfigFactory,
) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        by_app = await exchange(port, b"GET /app-close HTTP/1.1\r\nHost: t\r\n\r\n" + GET)
        by_client = await exchange(
            port, b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, Close\r\n\r\n" + GET
        )
    [app_reply] = parse_all(by_app)
    assert (app_reply.status, app_reply.body) == (200, b"bye")
    assert app_reply.header("connection") == "close"
    [client_reply] = parse_all(by_client)
    assert client_reply.header("connection") == "close"
    assert len(app.requests) == 2, "nothing after a closing response is dispatched"


async def test_client_disconnect_cancels_dispatch(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config()) as port:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
            with anyio.fail_after(WAIT_S):
                await app.entered.wait()
            await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(WAIT_S):
            await app.cancelled.wait()
        await assert_new_client_served(port)


# ----------------------------------------------------------------- timeouts


async def test_incomplete_head_times_out_with_408(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config(header_timeout_s=0.2)) as port:
        replies = parse_all(await exchange(port, b"GET /echo HTTP/1.1\r\nHost: t\r\n"))
    assert replies[0].status == 408
    assert replies[0].json() == {"error": "request timeout"}


async def test_stalled_body_times_out_with_408(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config(header_timeout_s=0.2)) as port:
        replies = parse_all(
            await exchange(port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        )
    assert replies[0].status == 408


async def test_idle_connections_are_closed_silently(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config(keepalive_timeout_s=0.2)) as port:
        never_spoke = await exchange(port)
        after_one = parse_all(await exchange(port, GET))
    assert never_spoke == b""
    assert [r.status for r in after_one] == [200]


# -------------------------------------------------------------------- config


async def test_auto_transport_is_the_protocol_one_on_asyncio_and_streams_on_trio(
    anyio_backend: str,
) -> None:
    assert ServerConfig().transport == "auto"
    assert _use_protocol("auto") is (anyio_backend == "asyncio")
    assert not _use_protocol("streams")
    if anyio_backend == "asyncio":
        assert _use_protocol("protocol")
    else:
        with pytest.raises(ConfigError, match="needs anyio's asyncio backend"):
            _use_protocol("protocol")


def test_config_rejects_bad_values_by_name() -> None:
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ConfigError, match="keepalive_timeout_s"):
        ServerConfig(keepalive_timeout_s=0)
    with pytest.raises(ConfigError, match="max_pipelined"):
        ServerConfig(max_pipelined=0)
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServerConfig(max_body_bytes=-1)
    with pytest.raises(ConfigError, match=r"transport must be one of auto, streams, protocol"):
        ServerConfig(transport="uvloop")  # type: ignore[arg-type]
