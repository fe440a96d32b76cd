"""Stand-in apps for the server tests, and a tiny server script for subprocess tests.

Run from the ``tests`` directory:
``python -c "from server_apps import main; raise SystemExit(main())" --workers N
--transport T``
serves :data:`announcing_app` on a free port, prints ``PORT_MARKER<port>`` on
stdout once it accepts connections, and ``STARTED_MARKER<path>`` whenever a
``/sleep`` request starts.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import get_args

import anyio
import anyio.abc
import orjson
import structlog

from zerver.core._http import Request, Response
from zerver.http._server import ServerConfig, Transport, run

PORT_MARKER = "ZT-PORT "
STARTED_MARKER = "ZT-STARTED "
MAX_SLEEP_S = 5.0
CLIENT_TIMEOUT_S = 5.0
WAIT_S = 5.0  # every wait in the server tests is bounded; none is expected to come close
# The server tests run against every concrete transport ("auto" picks one of them).
TRANSPORTS: tuple[Transport, ...] = ("streams", "protocol")
ConfigFactory = Callable[..., ServerConfig]


class StandInApp:
    """A ``ServerApp`` whose behaviour is chosen by the request path.

    * ``/boom`` raises; ``/bad-status`` returns a 1xx status as final response;
    * ``/wait`` sets :attr:`entered`, then waits for :attr:`release`; if it is
      cancelled instead it sets :attr:`cancelled`;
    * ``/sleep?s=0.3`` sleeps (at most ``MAX_SLEEP_S``);
    * ``/status/<code>`` answers that status; ``/lying-length`` declares a wrong
      Content-Length; ``/pid`` answers the process id;
    * ``/bad-header-name`` and ``/bad-header-value`` return a header h11 would
      refuse to send; ``/app-close`` asks for ``Connection: close``;
    * anything else echoes the request as JSON.
    """

    def __init__(self, *, announce: bool = False) -> None:
        self.announce = announce
        self.lifespan_entered = False
        self.lifespan_exited = False
        self.requests: list[Request] = []
        # anyio events need a running event loop; they are made in lifespan().
        self._entered: anyio.Event | None = None
        self._release: anyio.Event | None = None
        self._cancelled: anyio.Event | None = None

    @property
    def entered(self) -> anyio.Event:
        if self._entered is None:
            raise RuntimeError("the app's lifespan has not started")
        return self._entered

    @property
    def release(self) -> anyio.Event:
        if self._release is None:
            raise RuntimeError("the app's lifespan has not started")
        return self._release

    @property
    def cancelled(self) -> anyio.Event:
        if self._cancelled is None:
            raise RuntimeError("the app's lifespan has not started")
        return self._cancelled

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self._entered = anyio.Event()
        self._release = anyio.Event()
        self._cancelled = anyio.Event()
        self.lifespan_entered = True
        try:
            yield
        finally:
            self.lifespan_exited = True

    async def dispatch(self, request: Request) -> Response:
        self.requests.append(request)
        path = request.path
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/bad-status":
            return Response(101)
        if path == "/wait":
            self.entered.set()
            try:
                await self.release.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.set()
                raise
            return Response.text("released")
        if path == "/sleep":
            if self.announce:
                print(f"{STARTED_MARKER}{path}", flush=True)
            seconds = min(float(request.query_params.get("s", "0.1")), MAX_SLEEP_S)
            await anyio.sleep(seconds)
            return Response.text("slept")
        if path.startswith("/status/"):
            return Response(int(path.removeprefix("/status/")), b"")
        if path == "/lying-length":
            return Response(200, b"abc", [("Content-Length", "10"), ("X-Kept", "yes")])
        if path == "/pid":
            return Response.json({"pid": os.getpid()})
        if path == "/bad-header-name":
            return Response.text("x", headers=[("X Bad", "v")])
        if path == "/bad-header-value":
            return Response.text("x", headers=[("X-Injected", "v\r\nSet-Cookie: a=b")])
        if path == "/app-close":
            return Response.text("bye", headers=[("Connection", "close")])
        return Response.json(
            {
                "method": request.method,
                "path": path,
                "query": request.query,
                "body": request.body.decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
                "http_version": request.http_version,
                "scheme": request.scheme,
                "client": list(request.client) if request.client else None,
                "server": list(request.server) if request.server else None,
            }
        )


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> dict[str, object]:
        """The body as a JSON object (every stand-in and error body is one)."""
        value = orjson.loads(self.body)
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {self.body!r}")
        return value


async def read_until_eof(stream: anyio.abc.ByteStream) -> bytes:
    """Everything the server sends until it closes (a reset fails the test)."""
    data = bytearray()
    with anyio.fail_after(WAIT_S):
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                return bytes(data)


def http_client_requests(
    port: int, requests: Sequence[tuple[str, str, bytes | None]]
) -> list[Reply]:
    """Send requests over one ``http.client`` connection (blocking; run it in a thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
    try:
        replies = []
        for method, target, body in requests:
            conn.request(method, target, body=body)
            response = conn.getresponse()
            data = response.read()
            replies.append(
                Reply(response.status, [(k.lower(), v) for k, v in response.getheaders()], data)
            )
        return replies
    finally:
        conn.close()


announcing_app = StandInApp(announce=True)


def log_to_stderr() -> None:
    """Keep stdout for the markers: structlog writes to stderr."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def _print_port(port: int) -> None:
    print(f"{PORT_MARKER}{port}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve :data:`announcing_app` on a free port until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    parser.add_argument("--transport", choices=get_args(Transport), default="auto")
    args = parser.parse_args(argv)
    log_to_stderr()
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        shutdown_timeout_s=args.shutdown_timeout,
        transport=args.transport,
    )
    return run(
        "server_apps:announcing_app",
        config,
        args.workers,
        on_started=_print_port,
        worker_init=log_to_stderr,
    )
