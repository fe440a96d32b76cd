"""Real PostgreSQL and Redis servers on 127.0.0.1, free ports and temporary directories.

zerver's own test suite and its load test run the shared-backend interpreters
against servers they start themselves, from Debian's ``postgresql`` and
``redis-server`` packages; both start them through this module, so they start
them the same way. Nothing here imports pytest: the suite's fixtures (skip when
a binary is missing, fail under CI) live beside the tests.

* :class:`PgServer`: ``initdb`` into a directory (fsync off, password
  authentication over TCP, the unix socket in the same directory), ``pg_ctl``
  start and stop, keeping its port and data across a stop. ``initdb`` refuses
  to run as root, so as root the server runs as the ``postgres`` system user
  (Debian's package makes it) through ``runuser``, its directory handed over.
* :class:`RedisServer`: one ``redis-server`` process (no persistence unless
  asked), ready once it answers ``PING``.
* :func:`postgres_server` and :func:`redis_server`: each a context manager that
  starts one in a temporary directory and removes everything at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PgServer",
    "RedisServer",
    "find_pg_bindir",
    "find_redis_server",
    "free_port",
    "postgres_server",
    "redis_server",
]

_PG_TIMEOUT_S = 30
_PG_USER = "zerver"
_PG_PASSWORD = "s3cret-pw"
PG_RUN_AS = "postgres"
"""The system user the server runs as when the caller is root."""
_REDIS_START_TIMEOUT_S = 10.0
_REDIS_STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PostgreSQL ------------------------------------------------------------------------


def find_pg_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None."""
    pg_config = shutil.which("pg_config")
    candidates: list[Path] = []
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


class PgServer:
    """One PostgreSQL cluster; :meth:`stop` and :meth:`start` keep its port and data."""

    user = _PG_USER
    password = _PG_PASSWORD
    database = "zerver_test"

    def __init__(self, bindir: Path, directory: Path) -> None:
        self.bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "server.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        self._schemas = itertools.count(1)
        self.running = False

    def url(self, database: str = "postgres", *, password: str | None = _PG_PASSWORD) -> str:
        """``postgresql://zerver:<password>@127.0.0.1:<port>/<database>``."""
        auth = self.user if password is None else f"{self.user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def _run(self, args: Sequence[str | Path]) -> None:
        cmd = [str(a) for a in args]
        if self._as_root:
            cmd = ["runuser", "-u", PG_RUN_AS, "--", *cmd]
        done = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=_PG_TIMEOUT_S + 5,
            cwd=self.directory,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr[-2000:]}{log}"
            )

    def init(self) -> None:
        """``initdb`` with a password for :attr:`user` (scram over TCP, trust on the socket)."""
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            entry = pwd.getpwnam(PG_RUN_AS)
            for path in (self.directory, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                self.bindir / "initdb",
                "-D",
                self.data,
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def start(self) -> None:
        """Start the server and wait (bounded) until it accepts connections."""
        if self.running:
            return
        options = (
            f"-p {self.port} -c listen_addresses={self.host} -k {self.directory} "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=60"
        )
        self._run(
            [
                self.bindir / "pg_ctl",
                "-D",
                self.data,
                "-l",
                self.log,
                "-o",
                options,
                "-w",
                "-t",
                str(_PG_TIMEOUT_S),
                "start",
            ]
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` ends sessions at once; ``immediate`` is a crash)."""
        if not self.running:
            return
        self.running = False
        self._run(
            [
                self.bindir / "pg_ctl",
                "-D",
                self.data,
                "-m",
                mode,
                "-w",
                "-t",
                str(_PG_TIMEOUT_S),
                "stop",
            ]
        )

    def _connect(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True, connect_timeout=10)

    def create_database(self) -> None:
        """Create :attr:`database`, where the tests' schemas live."""
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"'.encode())

    def new_schema(self) -> str:
        """The URL (with the password) of an empty schema of its own in :attr:`database`,
        first on the connection's ``search_path``: tables made there are the caller's
        alone. (A schema costs nothing; each new database would copy the template's files.)"""
        name = f"test_{next(self._schemas)}"
        with self._connect(self.database) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"'.encode())
        return self.url(self.database) + f"?options=-csearch_path%3D{name}"


@contextlib.contextmanager
def postgres_server(bindir: Path | None = None) -> Iterator[PgServer]:
    """A running server with :attr:`PgServer.database` created; removed at the end.

    RuntimeError when the binaries are missing (``bindir`` defaults to
    :func:`find_pg_bindir`'s) or the server does not start.
    """
    bindir = bindir or find_pg_bindir()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL server binaries are not installed (Debian package postgresql)"
        )
    tmp = Path(tempfile.mkdtemp(prefix="zerver-pg-"))
    server = PgServer(bindir, tmp)
    try:
        server.init()
        server.start()
        server.create_database()
        yield server
    finally:
        try:
            server.stop("immediate")  # its data goes: no shutdown checkpoint to wait for
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# -- Redis -----------------------------------------------------------------------------


def find_redis_server() -> str | None:
    """The ``redis-server`` binary, or None."""
    found = shutil.which("redis-server")
    if found is None and Path("/usr/bin/redis-server").exists():
        found = "/usr/bin/redis-server"
    return found


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
        deadline = time.monotonic() + _REDIS_START_TIMEOUT_S
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
            proc.wait(timeout=_REDIS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_REDIS_STOP_TIMEOUT_S)


@contextlib.contextmanager
def redis_server(binary: str | None = None, *, persistent: bool = False) -> Iterator[RedisServer]:
    """A running redis-server in a temporary directory, stopped and removed at the end.

    RuntimeError when the binary is missing (``binary`` defaults to
    :func:`find_redis_server`'s) or the server does not start.
    """
    binary = binary or find_redis_server()
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    with tempfile.TemporaryDirectory(prefix="zerver-redis-") as tmp:
        server = RedisServer(binary, Path(tmp), persistent=persistent)
        server.start()
        try:
            yield server
        finally:
            server.stop()
