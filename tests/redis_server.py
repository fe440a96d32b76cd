"""A real redis-server for the tests: 127.0.0.1, a free port, a temporary directory.

``redis_server`` is one server for the whole session; tests that stop it (fault
tests) take ``own_redis_server`` instead, a server of their own, so that the
others never see it go away. The servers are started by
:func:`zerver.testing._servers.redis_server`, as the load test starts its own.
Without a ``redis-server`` binary (or the redis client library) the tests that
need one are skipped, saying why; under ``CI=true`` that is a failure instead,
so CI cannot pass by skipping them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import require

from zerver.testing._servers import RedisServer, find_redis_server
from zerver.testing._servers import redis_server as start_redis_server

__all__ = ["RedisServer", "own_redis_server", "redis_server", "require_redis"]


def require_redis() -> str:
    """The ``redis-server`` binary; skips the test (fails it under ``CI=true``) without one."""
    binary = find_redis_server()
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


def _serve(persistent: bool = False) -> Iterator[RedisServer]:
    with start_redis_server(require_redis(), persistent=persistent) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server shared by the session; tests keep apart by key prefix."""
    yield from _serve()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server for one test alone, which it may stop and start again."""
    yield from _serve()
