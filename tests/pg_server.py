"""A real PostgreSQL server for the tests: 127.0.0.1, a free port, a temporary directory.

``pg_server`` is one server for the whole session (``initdb`` into a temporary
directory, fsync off, password authentication over TCP, the unix socket in the
same directory), stopped and removed at the end. Tests keep apart by schema:
:meth:`PgServer.new_schema` makes an empty one and returns a URL that uses it.
A fault test may :meth:`PgServer.stop` and :meth:`PgServer.start` the server;
it keeps its port and its data.

The binaries are found through ``pg_config --bindir``, else under
``/usr/lib/postgresql/*/bin``. ``initdb`` refuses to run as root, so when the
tests run as root the server runs as the ``postgres`` system user (Debian's
package makes it) through ``runuser``, its directory handed to that user.
Without the binaries the tests that need them are skipped, saying why; under
``CI=true`` that is a failure instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import free_port, require

__all__ = ["PgServer", "find_bindir", "pg_server", "require_postgres"]

_TIMEOUT_S = 30
_USER = "zerver"
_PASSWORD = "s3cret-pw"
_RUN_AS = "postgres"


def find_bindir() -> Path | None:
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


def require_postgres() -> Path:
    """The PostgreSQL binary directory; skips the test (fails it under ``CI=true``) without one."""
    bindir = find_bindir()
    missing = None
    if bindir is None:
        missing = "PostgreSQL server binaries are not installed (Debian package postgresql)"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            missing = "the psycopg driver is not installed (extra 'postgres')"
    if missing is None and os.geteuid() == 0:
        try:
            pwd.getpwnam(_RUN_AS)
        except KeyError:
            missing = f"running as root needs the {_RUN_AS!r} system user to run the server"
    require(missing)
    assert bindir is not None
    return bindir


class PgServer:
    """One PostgreSQL cluster; :meth:`stop` and :meth:`start` keep its port and data."""

    user = _USER
    password = _PASSWORD
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

    def url(self, database: str = "postgres", *, password: str | None = _PASSWORD) -> str:
        """``postgresql://zerver:<password>@127.0.0.1:<port>/<database>``."""
        auth = self.user if password is None else f"{self.user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def _run(self, args: Sequence[str | Path]) -> None:
        cmd = [str(a) for a in args]
        if self._as_root:
            cmd = ["runuser", "-u", _RUN_AS, "--", *cmd]
        done = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S + 5,
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
            entry = pwd.getpwnam(_RUN_AS)
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
                str(_TIMEOUT_S),
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
                str(_TIMEOUT_S),
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
        first on the connection's ``search_path``: tables made there are the test's alone.
        (A schema costs nothing; each new database would copy the template's files.)"""
        name = f"test_{next(self._schemas)}"
        with self._connect(self.database) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"'.encode())
        return self.url(self.database) + f"?options=-csearch_path%3D{name}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server shared by the session; tests keep apart by schema."""
    bindir = require_postgres()
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
