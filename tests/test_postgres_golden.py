"""Golden traces of the demo's flows on PostgreSQL (golden_traces/postgres/).

The demo's scenarios (golden_traces/) with the database as the PostgreSQL
interpreter shows it: its static span attributes, the statement facts it notes
(``db.collection.name``, ``db.operation.name``, ``db.query.text`` built by the
same functions) and its park tokens, played by fakes on a virtual clock so that
every run is byte-identical. Re-record with
``pytest tests/test_postgres_golden.py --golden-update``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import pytest

from zerver import VirtualClock, load_settings
from zerver.core._errors import EffectError
from zerver.demo import SEED_AUTHORS, SEED_COMMENTS, SEED_POSTS, create_app
from zerver.export._spans import SpanData
from zerver.runtime.interpreters import PostgresInterpreter
from zerver.runtime.interpreters._postgres import get_statement, query_statement
from zerver.testing import FakeInterpreter, Scenario, assert_golden
from zerver.testing._scenarios import trace_requests

GOLDEN = Path(__file__).resolve().parent.parent / "golden_traces" / "postgres"

URL = "postgresql://blog:s3cret@db.internal:5432/blog"
_POST = SEED_POSTS["1"]
_AUTHOR = SEED_AUTHORS["ada"]


def _demo(**settings: Any) -> tuple[Any, FakeInterpreter]:
    clock = VirtualClock()
    app = create_app(
        settings=load_settings({"ZER_VER_DB_URL": URL}, **settings),
        clock=clock,
        rng=random.Random(7),
    )
    real = app.interpreters["db"]
    assert isinstance(real, PostgresInterpreter)
    db = FakeInterpreter(clock, span_attributes=dict(real.span_attributes))  # type: ignore[arg-type]
    cache = FakeInterpreter(clock, span_attributes={"cache.system": "in_process"})
    app.interpreter("db", db)
    app.interpreter("cache", cache)
    cache.rules = db.rules
    return app, db


def _get(table: str) -> dict[str, Any]:
    """What the interpreter notes for a ``DbGet`` on ``table``."""
    return {
        "db.collection.name": table,
        "db.operation.name": "SELECT",
        "db.query.text": get_statement(table),
    }


def _cache_hit(fake: FakeInterpreter) -> None:
    fake.on("cache.get author_profile", result=_AUTHOR, work_ms=0.05, note={"cache.hit": True})


def _io(ms: float) -> list[tuple[str, float, str | None]]:
    return [("io_wait", ms, "postgresql")]


async def happy() -> list[SpanData]:
    app, fake = _demo()
    fake.on("db.get blog_post", result=_POST, work_ms=0.4, parks=_io(1.2), note=_get("blog_post"))
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def cache_miss() -> list[SpanData]:
    app, fake = _demo()
    fake.on("db.get blog_post", result=_POST, work_ms=0.4, parks=_io(1.2), note=_get("blog_post"))
    fake.on("cache.get author_profile", result=None, work_ms=0.05, note={"cache.hit": False})
    fake.on("db.get author", result=_AUTHOR, work_ms=0.3, parks=_io(0.9), note=_get("author"))
    fake.on("cache.set author_profile", result=None, work_ms=0.05)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def db_unavailable() -> list[SpanData]:
    app, fake = _demo()
    fake.on(
        "db.get blog_post",
        error=EffectError(
            "postgresql at postgresql://blog:***@db.internal:5432/blog unavailable during "
            "get '1' from 'blog_post': connection refused",
            kind="db_unavailable",
            status_hint=503,
            retryable=True,
        ),
        work_ms=0.2,
        parks=_io(0.6),
        note=_get("blog_post"),
    )
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def park_heavy() -> list[SpanData]:
    app, fake = _demo()
    fake.on(
        "db.get blog_post",
        result=_POST,
        work_ms=0.5,
        parks=[("backpressure", 7.0, "db_pool", 4, 4), ("io_wait", 6.0, "postgresql")],
        note=_get("blog_post"),
    )
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def parallel_join_all() -> list[SpanData]:
    app, fake = _demo()
    fake.on("db.get blog_post", result=_POST, work_ms=0.4, parks=_io(1.0), note=_get("blog_post"))
    comments = [c for c in SEED_COMMENTS.values() if c["post_id"] == "1"]
    sql, _params = query_statement("comment", {"post_id": "1"}, order_by="created")
    fake.on(
        "db.query comment",
        result=comments,
        work_ms=0.6,
        parks=_io(1.5),
        note={"db.collection.name": "comment", "db.operation.name": "SELECT", "db.query.text": sql},
    )
    return await trace_requests(app, [("GET", "/blogs/posts/1/comments")])


SCENARIOS: list[Scenario] = [
    Scenario(name="happy_200", run=happy, description="post page, cache hit"),
    Scenario(name="cache_miss_200", run=cache_miss, description="miss falls through to the DB"),
    Scenario(name="db_unavailable_503", run=db_unavailable, description="server down"),
    Scenario(name="park_heavy", run=park_heavy, description="pool exhausted, long statement"),
    Scenario(name="parallel_join_all", run=parallel_join_all, description="two DB reads"),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_postgres_scenario_matches_golden(scenario: Scenario, golden_update: bool) -> None:
    spans = anyio.run(scenario.run)
    assert_golden(spans, GOLDEN / f"{scenario.name}.json", mask=scenario.mask, update=golden_update)


def test_no_secret_in_any_golden_file() -> None:
    for path in sorted(GOLDEN.glob("*.json")):
        assert "s3cret" not in path.read_text(), path
