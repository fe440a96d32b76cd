"""Graceful shutdown: in-process via the shutdown event, and real processes via signals."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from server_apps import (
    PORT_MARKER,
    STARTED_MARKER,
    TRANSPORTS,
    WAIT_S,
    Reply,
    StandInApp,
    http_client_requests,
    read_until_eof,
)

from zerver.core._errors import ConfigError, UsageError
from zerver.http._server import ServerConfig, Transport, load_app, run, serve

pytestmark = pytest.mark.anyio

TESTS_DIR = Path(__file__).resolve().parent
# A fresh interpreter (or two, with workers) has to import zerver before it listens.
STARTUP_S = 20.0
SCRIPT = "from server_apps import main; raise SystemExit(main())"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Transport:
    """The transport under test (each test that serves runs on both)."""
    value: Transport = request.param
    return value


# --------------------------------------------------------------- in process


async def test_shutdown_finishes_busy_connections_and_closes_idle_ones(
    transport: Transport,
) -> None:
    app = StandInApp()
    shutdown = anyio.Event()
    config = ServerConfig(host="127.0.0.1", port=0, transport=transport)
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(functools.partial(serve, app, config, shutdown=shutdown))
        async with (
            await anyio.connect_tcp("127.0.0.1", port) as idle,
            await anyio.connect_tcp("127.0.0.1", port) as busy,
        ):
            await idle.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            with anyio.fail_after(WAIT_S):
                first = await idle.receive()
            assert first.startswith(b"HTTP/1.1 200 ")
            await busy.send(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
            with anyio.fail_after(WAIT_S):
                await app.entered.wait()

            shutdown.set()
            assert await read_until_eof(idle) == b"", "an idle connection closes at once"
            # The listener closed before idle connections were; new clients are refused.
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", port)
            await anyio.wait_all_tasks_blocked()
            assert not app.lifespan_exited, "lifespan waits for the request in flight"

            app.release.set()
            answer = await read_until_eof(busy)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close\r\n" in answer
    assert answer.endswith(b"released")
    assert app.lifespan_exited
    assert not app.cancelled.is_set()


async def test_shutdown_timeout_cancels_requests_in_flight(transport: Transport) -> None:
    app = StandInApp()
    shutdown = anyio.Event()
    config = ServerConfig(host="127.0.0.1", port=0, shutdown_timeout_s=0.2, transport=transport)
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            port: int = await tg.start(functools.partial(serve, app, config, shutdown=shutdown))
            async with await anyio.connect_tcp("127.0.0.1", port) as busy:
                await busy.send(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
                await app.entered.wait()
                shutdown.set()
                await app.cancelled.wait()
                assert await read_until_eof(busy) == b""
    assert app.lifespan_exited


async def test_shutdown_with_no_connections_returns_promptly(transport: Transport) -> None:
    app = StandInApp()
    shutdown = anyio.Event()
    shutdown.set()
    with anyio.fail_after(WAIT_S):
        await serve(
            app, ServerConfig(host="127.0.0.1", port=0, transport=transport), shutdown=shutdown
        )
    assert app.lifespan_entered and app.lifespan_exited


async def test_a_port_in_use_is_a_config_error(transport: Transport) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve(
                StandInApp(), ServerConfig(host="127.0.0.1", port=port, transport=transport)
            )


# ------------------------------------------------------------- run() checks


def test_run_refuses_bad_arguments() -> None:
    config = ServerConfig(port=0)
    with pytest.raises(UsageError, match="workers must be 1 or more, got 0"):
        run("server_apps:announcing_app", config, workers=0)
    with pytest.raises(UsageError, match="import string"):
        run(StandInApp(), config, workers=2)


def test_load_app_names_what_is_wrong() -> None:
    assert isinstance(load_app("server_apps:announcing_app"), StandInApp)
    assert isinstance(load_app("server_apps:StandInApp"), StandInApp)  # a factory
    with pytest.raises(UsageError, match=r"module:attribute"):
        load_app("server_apps")
    with pytest.raises(UsageError, match=r"cannot import module 'nope_no_such_module'"):
        load_app("nope_no_such_module:app")
    with pytest.raises(UsageError, match=r"no attribute 'missing'"):
        load_app("server_apps:missing")
    with pytest.raises(UsageError, match="no lifespan"):
        load_app("server_apps:PORT_MARKER")


# ------------------------------------------------------------ real processes


@contextlib.asynccontextmanager
async def server_process(
    tmp_path: Path, workers: int, transport: Transport
) -> AsyncIterator[tuple[anyio.abc.Process, BufferedByteReceiveStream, int]]:
    """Run the server script in a subprocess; yields it, its stdout and its port."""
    stderr_path = tmp_path / "server-stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [sys.executable, "-c", SCRIPT, "--workers", str(workers), "--transport", transport],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=TESTS_DIR,
        )
        async with process:
            try:
                assert process.stdout is not None
                lines = BufferedByteReceiveStream(process.stdout)
                with anyio.fail_after(STARTUP_S):
                    port = int(await wait_for_marker(lines, PORT_MARKER))
                yield process, lines, port
            except BaseException:
                if process.returncode is None:
                    process.kill()
                print(stderr_path.read_text(), file=sys.stderr)
                raise


async def wait_for_marker(lines: BufferedByteReceiveStream, marker: str) -> str:
    """The rest of the first stdout line starting with ``marker``."""
    while True:
        line = (await lines.receive_until(b"\n", 4096)).decode()
        if line.startswith(marker):
            return line.removeprefix(marker)


async def wait_exit(process: anyio.abc.Process) -> int:
    with anyio.fail_after(WAIT_S + 5):
        return await process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_lets_the_request_in_flight_finish(
    tmp_path: Path, signum: signal.Signals, transport: Transport
) -> None:
    replies: list[Reply] = []

    async with server_process(tmp_path, workers=1, transport=transport) as (process, lines, port):

        async def slow_request() -> None:
            replies.extend(
                await anyio.to_thread.run_sync(
                    http_client_requests, port, [("GET", "/sleep?s=0.5", None)]
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_request)
            with anyio.fail_after(WAIT_S):
                await wait_for_marker(lines, STARTED_MARKER)
            process.send_signal(signum)
        assert await wait_exit(process) == 0

    [reply] = replies
    assert (reply.status, reply.body) == (200, b"slept")
    assert reply.header("connection") == "close"


async def test_two_workers_share_the_port_and_stop_on_sigterm(
    tmp_path: Path, transport: Transport
) -> None:
    async with server_process(tmp_path, workers=2, transport=transport) as (process, _lines, port):
        replies = [
            (await anyio.to_thread.run_sync(http_client_requests, port, [("GET", "/pid", None)]))[0]
            for _ in range(4)
        ]
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process) == 0

    assert [r.status for r in replies] == [200] * 4
    pids = {r.json()["pid"] for r in replies}
    assert process.pid not in pids, "workers, not the supervisor, serve requests"
    assert os.getpid() not in pids


async def test_a_cancellation_the_connection_did_not_ask_for_passes_through() -> None:
    """On the Protocol transport a busy period is one asyncio task, which the
    connection cancels itself when the client goes or shutdown times out. A
    cancellation from anywhere else is not swallowed as if it were the
    connection's own; the server goes on serving other connections."""
    app = StandInApp()
    shutdown = anyio.Event()
    config = ServerConfig(host="127.0.0.1", port=0, transport="protocol")
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            port: int = await tg.start(functools.partial(serve, app, config, shutdown=shutdown))
            async with await anyio.connect_tcp("127.0.0.1", port) as busy:
                await busy.send(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
                await app.entered.wait()
                (task,) = [
                    t
                    for t in asyncio.all_tasks()
                    if getattr(t.get_coro(), "__qualname__", "") == "ProtocolConnection._serve"
                ]
                task.cancel()
                await app.cancelled.wait()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert task.cancelled()
                replies = await anyio.to_thread.run_sync(
                    http_client_requests, port, [("GET", "/echo", None)]
                )
                assert replies[0].status == 200
            shutdown.set()
    assert app.lifespan_exited
