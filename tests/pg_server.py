"""A real PostgreSQL server for the tests: 127.0.0.1, a free port, a temporary directory.

``pg_server`` is one server for the whole session (:func:`zerver.testing._servers.postgres_server`:
``initdb`` into a temporary directory, fsync off, password authentication over
TCP), stopped and removed at the end. Tests keep apart by schema:
:meth:`PgServer.new_schema` makes an empty one and returns a URL that uses it.
A fault test may :meth:`PgServer.stop` and :meth:`PgServer.start` the server;
it keeps its port and its data. The load test starts its servers through the
same module.

Without the binaries (found through ``pg_config --bindir``, else under
``/usr/lib/postgresql/*/bin``) the tests that need them are skipped, saying
why; under ``CI=true`` that is a failure instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import require

from zerver.testing._servers import PG_RUN_AS, PgServer, postgres_server
from zerver.testing._servers import find_pg_bindir as find_bindir

__all__ = ["PgServer", "find_bindir", "pg_server", "require_postgres"]


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
            pwd.getpwnam(PG_RUN_AS)
        except KeyError:
            missing = f"running as root needs the {PG_RUN_AS!r} system user to run the server"
    require(missing)
    assert bindir is not None
    return bindir


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server shared by the session; tests keep apart by schema."""
    with postgres_server(require_postgres()) as server:
        yield server
