"""A real redis-server for the tests: 127.0.0.1, a free port, a temporary directory.

``redis_server`` is one server for the whole session; tests that stop it (fault
tests) take ``own_redis_server`` instead, a server of their own, so that the
others never see it go away. Without a ``redis-server`` binary (or the redis
client library) the tests that need one are skipped, saying why; under
``CI=true`` that is a failure instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, require

__all__ = ["RedisServer", "own_redis_server", "redis_server", "require_redis"]

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


def require_redis() -> str:
    """The ``redis-server`` binary; skips the test (fails it under ``CI=true``) without one."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    missing = None
    if binary is None:
        missing = "redis-server is not installed (Debian package redis-server)"
    else:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:
            missing = "the redis client library is not installed (extra 'redis')"
    require(missing)
    assert binary is not None
    return binary


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` keep its port."""

    def __init__(self, binary: str, directory: Path, *, persistent: bool = False) -> None:
        self.binary = binary
        self.directory = directory
        self.persistent = persistent
        self.host = "127.0.0.1"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers ``PING``."""
        if self.running:
            return
        args = [
            self.binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if not self.persistent:
            args += ["--save", "", "--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {log}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")

    def ping(self) -> bool:
        """Whether the server answers ``PING`` now."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); its data goes with it
        unless ``persistent``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_STOP_TIMEOUT_S)


def _serve(persistent: bool = False) -> Iterator[RedisServer]:
    binary = require_redis()
    with tempfile.TemporaryDirectory(prefix="zerver-redis-") as tmp:
        server = RedisServer(binary, Path(tmp), persistent=persistent)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server shared by the session; tests keep apart by key prefix."""
    yield from _serve()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server for one test alone, which it may stop and start again."""
    yield from _serve()
