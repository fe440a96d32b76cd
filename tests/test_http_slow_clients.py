"""Clients that hold resources, on both transports: slow bodies, peers that never read,
too many connections, and a process out of file descriptors.

Deadlines are configured short; every wait is bounded by ``WAIT_S``. A test
that must see the server give up waits for the server's own log line rather
than for a fixed time.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.abc
import pytest
import structlog
from server_apps import PORT_MARKER, TRANSPORTS, WAIT_S, ConfigFactory, StandInApp
from test_server_wire import GET, exchange, parse_all, read_response, running

from zerver.core._http import Request, Response
from zerver.http._server import Transport

pytestmark = pytest.mark.anyio

TESTS_DIR = Path(__file__).resolve().parent
BIG = 256 * 1024
CLOSE_GET = GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
WRITE_TIMED_OUT = "write timed out; dropping the connection"


class BigApp(StandInApp):
    """The stand-in app, plus ``/big``: a response of ``BIG`` bytes."""

    async def dispatch(self, request: Request) -> Response:
        if request.path == "/big":
            self.requests.append(request)
            return Response.bytes(b"x" * BIG)
        return await super().dispatch(request)


async def wait_for_event(logs: Sequence[Mapping[str, object]], event: str) -> None:
    """Until the server logs ``event`` (bounded)."""
    with anyio.fail_after(WAIT_S):
        while not any(e.get("event") == event for e in logs):
            await anyio.sleep(0.01)


async def assert_served_soon(port: int) -> None:
    """A new client is served once the server has noticed a closed connection (bounded)."""
    with anyio.fail_after(WAIT_S):
        while True:
            replies = parse_all(await exchange(port, CLOSE_GET))
            if replies[0].status == 200:
                return
            assert replies[0].status == 503
            await anyio.sleep(0.01)


# --------------------------------------------------------------- slow bodies


async def test_a_trickled_body_meets_the_overall_deadline(config: ConfigFactory) -> None:
    # Each byte comes well within header_timeout_s; only the overall deadline can end it.
    app = StandInApp()
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
    sent = 0
    async with (
        running(app, config(header_timeout_s=5.0, body_timeout_s=0.3)) as port,
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(head)
        answer = b""
        with anyio.fail_after(WAIT_S):
            while not answer:
                await stream.send(b"x")
                sent += 1
                with anyio.move_on_after(0.02):
                    answer = await stream.receive()
            while True:
                try:
                    answer += await stream.receive()
                except anyio.EndOfStream:
                    break
    [reply] = parse_all(answer)
    assert reply.status == 408
    assert reply.json() == {"error": "request timeout"}
    assert sent < 100000
    assert app.requests == []


async def test_a_body_that_arrives_in_time_is_served(config: ConfigFactory) -> None:
    app = StandInApp()
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    async with running(app, config(body_timeout_s=5.0)) as port:
        [reply] = parse_all(await exchange(port, head, b"he", b"llo"))
    assert reply.json()["body"] == "hello"


# ------------------------------------------------------- peers that never read


def send_and_never_read(port: int, data: bytes) -> socket.socket:
    """A blocking client with a tiny receive buffer that sends ``data`` and reads nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(data)
    return sock


def read_until_gone(sock: socket.socket) -> int:
    """Bytes read until the server's close or reset (blocking, bounded by the socket timeout)."""
    total = 0
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


async def test_a_peer_that_never_reads_is_dropped_and_stops_being_read(
    config: ConfigFactory,
) -> None:
    app = BigApp()
    count = 100
    burst = b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * count
    with structlog.testing.capture_logs() as logs:
        async with running(app, config(write_timeout_s=0.3)) as port:
            sock = await anyio.to_thread.run_sync(send_and_never_read, port, burst)
            try:
                await wait_for_event(logs, WRITE_TIMED_OUT)
                dispatched = len(app.requests)
                received = await anyio.to_thread.run_sync(read_until_gone, sock)
            finally:
                sock.close()
            await assert_served_soon(port)
    # Output waiting on the peer stopped the server from answering (and reading)
    # the rest of the pipeline; the stalled connection was dropped.
    assert dispatched < count
    assert received < count * BIG
    assert len([r for r in app.requests if r.path == "/big"]) == dispatched


async def test_a_reading_peer_gets_every_large_response(config: ConfigFactory) -> None:
    app = BigApp()
    async with (
        running(app, config(write_timeout_s=5.0)) as port,
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
        buffer = bytearray()
        replies = [await read_response(stream, buffer) for _ in range(3)]
    assert [len(r.body) for r in replies] == [BIG] * 3


# ------------------------------------------------------------- connection cap


async def test_connections_past_max_connections_get_503(config: ConfigFactory) -> None:
    app = StandInApp()
    async with running(app, config(max_connections=2)) as port:
        first = await anyio.connect_tcp("127.0.0.1", port)
        second = await anyio.connect_tcp("127.0.0.1", port)
        for stream in (first, second):
            await stream.send(GET)
            assert (await read_response(stream, bytearray())).status == 200
        [busy] = parse_all(await exchange(port, GET))
        await first.aclose()
        await assert_served_soon(port)
        await second.aclose()
    assert busy.status == 503
    assert busy.json() == {"error": "too many connections"}
    assert busy.header("connection") == "close"
    assert [r.path for r in app.requests] == ["/echo"] * 3


async def test_past_twice_max_connections_new_connections_are_closed_unanswered(
    config: ConfigFactory,
) -> None:
    app = StandInApp()
    async with (
        running(app, config(max_connections=1)) as port,
        await anyio.connect_tcp("127.0.0.1", port) as served,
    ):
        await served.send(GET)
        assert (await read_response(served, bytearray())).status == 200
        # Refused and lingering until this client's EOF: it holds the refusal slot.
        async with await anyio.connect_tcp("127.0.0.1", port) as refused:
            with anyio.fail_after(WAIT_S):
                assert (await refused.receive()).startswith(b"HTTP/1.1 503 ")
            dropped = await exchange_allowing_reset(port)
    assert dropped == b""
    assert len(app.requests) == 1


async def exchange_allowing_reset(port: int) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        data = b""
        with anyio.fail_after(WAIT_S):
            try:
                await stream.send(GET)
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data


# ------------------------------------------------------ out of file descriptors

FD_LIMIT = 64
CLIENTS = 90
# Imports first (they open files), then a low descriptor limit and a short
# back-off, so that accepting fails many times while the test holds the descriptors.
FD_SCRIPT = f"""
import resource, sys
import server_apps
import zerver.http._server
zerver.http._server._ACCEPT_BACKOFF_S = 0.01
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, hard))
raise SystemExit(server_apps.main(sys.argv[1:]))
"""


def wait_for_text(path: Path, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{path.read_text()}"
        time.sleep(0.01)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_running_out_of_file_descriptors_backs_off_and_logs_once(
    transport: Transport, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-c", FD_SCRIPT, "--transport", transport],
            cwd=TESTS_DIR,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    clients: list[socket.socket] = []
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith(PORT_MARKER), stderr_path.read_text()
        port = int(line.removeprefix(PORT_MARKER))
        for _ in range(CLIENTS):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT_S))
        wait_for_text(stderr_path, "accept failed; backing off")
        # Hold the descriptors while the server retries (every 10 ms) many times.
        time.sleep(0.5)
        for sock in clients:
            sock.close()
        clients.clear()
        wait_for_text(stderr_path, "accepting connections again")
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(CLOSE_GET)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in clients:
            sock.close()
        server.send_signal(signal.SIGTERM)
        server.wait(WAIT_S)
        if server.stdout is not None:
            server.stdout.close()
    log = stderr_path.read_text()
    assert "Traceback" not in log
    assert log.count("accept failed; backing off") == 1
    again = re.search(r"accepting connections again.*?failures=(\d+)", log)
    assert again is not None, log
    assert int(again.group(1)) > 1
