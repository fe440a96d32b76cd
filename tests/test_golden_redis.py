"""Golden traces of the demo's flows on shared backends (golden_traces/redis/).

The demo as the scale-out recipe runs it (docs/backends.md): the database on
PostgreSQL, the cache and the broker on Redis. Each interpreter is played by a
fake on a virtual clock that shows what the real one shows: its static span
attributes (taken from the real interpreter built from the same settings,
credentials masked away), the facts it notes (``cache.hit``, the statement,
the stream entry id) and its park tokens (``redis``, ``cache_pool``), so every
run is byte-identical and a change in the span shape on Redis fails here.
Re-record with ``pytest tests/test_golden_redis.py --golden-update``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from zerver import MemoryBroker, VirtualClock, load_settings
from zerver.core._errors import EffectError
from zerver.demo import SEED_AUTHORS, SEED_POSTS, create_app
from zerver.export._spans import SpanData
from zerver.runtime._messaging_redis import RedisStreamsBroker
from zerver.runtime.interpreters import PostgresInterpreter, RedisCacheInterpreter
from zerver.runtime.interpreters._postgres import get_statement, put_statement
from zerver.runtime.interpreters._redis import RedisTarget, redis_failure
from zerver.testing import FakeInterpreter, Scenario, assert_golden
from zerver.testing._scenarios import trace_requests

GOLDEN = Path(__file__).resolve().parent.parent / "golden_traces" / "redis"

DB_URL = "postgresql://blog:s3cret@db.internal:5432/blog"
REDIS_URL = "redis://blog:s3cret@cache.internal:6379/0"
_POST = SEED_POSTS["1"]
_AUTHOR = SEED_AUTHORS["ada"]
_ENTRY_ID = "1767261600000-0"  # what XADD answers: <milliseconds>-<sequence>


def _demo(**settings: Any) -> tuple[Any, FakeInterpreter]:
    clock = VirtualClock()
    app = create_app(
        settings=load_settings(
            {
                "ZER_VER_DB_URL": DB_URL,
                "ZER_VER_CACHE_URL": REDIS_URL,
                "ZER_VER_BROKER_URL": REDIS_URL,
            },
            **settings,
        ),
        clock=clock,
        rng=random.Random(7),
    )
    real_db = app.interpreters["db"]
    real_cache = app.interpreters["cache"]
    assert isinstance(real_db, PostgresInterpreter)
    assert isinstance(real_cache, RedisCacheInterpreter)
    assert isinstance(app.broker, RedisStreamsBroker)
    db = FakeInterpreter(clock, span_attributes=dict(real_db.span_attributes))  # type: ignore[arg-type]
    cache = FakeInterpreter(clock, span_attributes=dict(real_cache.span_attributes))  # type: ignore[arg-type]
    queue = FakeInterpreter(clock, span_attributes={"messaging.system": app.broker.system})
    app.interpreter("db", db)
    app.interpreter("cache", cache)
    app.interpreter("queue", queue)
    # The demo's consumer reads from the app's broker: one that never delivers here.
    app.broker = MemoryBroker()
    # One rule book for all: each fake answers only its own system's effects.
    cache.rules = queue.rules = db.rules
    return app, db


def _get(table: str) -> dict[str, Any]:
    """What the PostgreSQL interpreter notes for a ``DbGet`` on ``table``."""
    return {
        "db.collection.name": table,
        "db.operation.name": "SELECT",
        "db.query.text": get_statement(table),
    }


def _redis(ms: float) -> list[tuple[str, float, str | None]]:
    return [("io_wait", ms, "redis")]


def _pg(ms: float) -> list[tuple[str, float, str | None]]:
    return [("io_wait", ms, "postgresql")]


def _post_read(fake: FakeInterpreter) -> None:
    fake.on("db.get blog_post", result=_POST, work_ms=0.4, parks=_pg(1.2), note=_get("blog_post"))


def _cache_hit(fake: FakeInterpreter) -> None:
    fake.on(
        "cache.get author_profile",
        result=_AUTHOR,
        work_ms=0.05,
        parks=_redis(0.3),
        note={"cache.hit": True},
    )


def _unavailable(what: str) -> EffectError:
    """The failure the Redis interpreter raises for a refused connection."""
    refused = ConnectionRefusedError(111, "Connection refused")
    return redis_failure(refused, what, RedisTarget.parse(REDIS_URL), prefix="cache")


async def happy() -> list[SpanData]:
    app, fake = _demo()
    _post_read(fake)
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def cache_miss() -> list[SpanData]:
    app, fake = _demo()
    _post_read(fake)
    fake.on(
        "cache.get author_profile",
        result=None,
        work_ms=0.05,
        parks=_redis(0.3),
        note={"cache.hit": False},
    )
    fake.on("db.get author", result=_AUTHOR, work_ms=0.3, parks=_pg(0.9), note=_get("author"))
    fake.on("cache.set author_profile", result=None, work_ms=0.05, parks=_redis(0.25))
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def cache_unavailable() -> list[SpanData]:
    """Redis down: both optional cache effects fail at once, the page still answers."""
    app, fake = _demo()
    _post_read(fake)
    fake.on(
        "cache.get author_profile",
        error=_unavailable("cache.get author_profile"),
        work_ms=0.05,
        parks=_redis(0.2),
    )
    fake.on("db.get author", result=_AUTHOR, work_ms=0.3, parks=_pg(0.9), note=_get("author"))
    fake.on(
        "cache.set author_profile",
        error=_unavailable("cache.set author_profile"),
        work_ms=0.05,
        parks=_redis(0.2),
    )
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def cache_pool_full() -> list[SpanData]:
    """Every connection of the process's Redis pool busy: the lookup waits for one."""
    app, fake = _demo()
    _post_read(fake)
    fake.on(
        "cache.get author_profile",
        result=_AUTHOR,
        work_ms=0.05,
        parks=[("backpressure", 7.0, "cache_pool", 16, 16), ("io_wait", 6.0, "redis")],
        note={"cache.hit": True},
    )
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def post_created() -> list[SpanData]:
    """A new post stored on PostgreSQL and announced on the Redis stream."""
    app, fake = _demo()
    fake.on("db.get author", result=_AUTHOR, work_ms=0.3, parks=_pg(0.9), note=_get("author"))
    fake.on(
        "db.put blog_post",
        result=None,
        work_ms=0.4,
        parks=_pg(1.4),
        note={
            "db.collection.name": "blog_post",
            "db.operation.name": "INSERT",
            "db.query.text": put_statement("blog_post"),
        },
    )
    fake.on(
        "queue.publish blog.post.created",
        result=_ENTRY_ID,
        work_ms=0.05,
        parks=_redis(0.35),
        # What the broker's interpreter notes: the entry id, the body's bytes (the
        # event's JSON: the post's id is always 12 hex digits, so the size is fixed).
        note={
            "messaging.message.id": _ENTRY_ID,
            "messaging.message.body.size": len(
                orjson.dumps({"id": "0" * 12, "author_id": "ada", "title": "Shared"})
            ),
        },
    )
    body = orjson.dumps({"title": "Shared", "body": "On every worker.", "author_id": "ada"})
    return await trace_requests(app, [("POST", "/blogs/posts")], body=body)


SCENARIOS: list[Scenario] = [
    Scenario(name="happy_200", run=happy, description="post page, Redis cache hit"),
    Scenario(name="cache_miss_200", run=cache_miss, description="miss, DB read, cache refill"),
    Scenario(
        name="cache_unavailable_200", run=cache_unavailable, description="Redis down: still 200"
    ),
    Scenario(name="cache_pool_full", run=cache_pool_full, description="waits for a connection"),
    Scenario(
        name="post_created_201",
        run=post_created,
        description="stored, then published",
        mask=("db.key",),  # the new post's id is random
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_redis_scenario_matches_golden(scenario: Scenario, golden_update: bool) -> None:
    spans = anyio.run(scenario.run)
    assert_golden(spans, GOLDEN / f"{scenario.name}.json", mask=scenario.mask, update=golden_update)


def test_every_golden_file_has_its_scenario_and_no_secret() -> None:
    names = {path.stem for path in GOLDEN.glob("*.json")}
    assert names == {s.name for s in SCENARIOS}
    for path in sorted(GOLDEN.glob("*.json")):
        assert "s3cret" not in path.read_text(), path
