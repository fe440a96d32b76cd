"""The demo's golden-trace scenarios: its flows with fake interpreters on a virtual clock.

Every run is byte-identical: time only moves when a fake interpreter says
so, and ids come from a seeded generator. ``zerver golden check`` compares
them with ``golden_traces/``; ``zerver golden update`` re-records.
"""

from __future__ import annotations

import random
from typing import Any

from zerver._config import load_settings
from zerver.core._clock import VirtualClock
from zerver.core._errors import EffectError
from zerver.export._spans import SpanData
from zerver.testing._client import FakeInterpreter
from zerver.testing._scenarios import Scenario, trace_requests

from ._blog import SEED_AUTHORS, SEED_COMMENTS, SEED_POSTS, create_app

__all__ = ["SCENARIOS"]

_POST = SEED_POSTS["1"]
_AUTHOR = SEED_AUTHORS["ada"]


def _demo(**settings: Any) -> tuple[Any, FakeInterpreter]:
    clock = VirtualClock()
    app = create_app(settings=load_settings({}, **settings), clock=clock, rng=random.Random(7))
    # Stand-ins for the embedded SQLite and cache: same span attributes, virtual time.
    db = FakeInterpreter(clock, span_attributes={"db.system": "sqlite"})
    cache = FakeInterpreter(clock, span_attributes={"cache.system": "in_process"})
    app.interpreter("db", db)
    app.interpreter("cache", cache)
    # One rule book for both: each fake answers only its own system's effects.
    cache.rules = db.rules
    return app, db


def _cache_hit(fake: FakeInterpreter) -> None:
    fake.on("cache.get author_profile", result=_AUTHOR, work_ms=0.05, note={"cache.hit": True})


async def happy(**settings: Any) -> list[SpanData]:
    app, fake = _demo(**settings)
    fake.on("db.get blog_post", result=_POST, work_ms=0.4, parks=[("io_wait", 1.2, "sqlite")])
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def cache_miss() -> list[SpanData]:
    app, fake = _demo()
    fake.on("db.get blog_post", result=_POST, work_ms=0.4, parks=[("io_wait", 1.2, "sqlite")])
    fake.on("cache.get author_profile", result=None, work_ms=0.05, note={"cache.hit": False})
    fake.on("db.get author", result=_AUTHOR, work_ms=0.3, parks=[("io_wait", 0.9, "sqlite")])
    fake.on("cache.set author_profile", result=None, work_ms=0.05)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def not_found() -> list[SpanData]:
    app, fake = _demo()
    fake.on("db.get blog_post", result=None, work_ms=0.3, parks=[("io_wait", 0.8, "sqlite")])
    fake.on("cache.get author_profile", result=None, work_ms=0.05, note={"cache.hit": False})
    return await trace_requests(app, [("GET", "/blogs/posts/404")])


async def db_failure() -> list[SpanData]:
    app, fake = _demo()
    fake.on(
        "db.get blog_post",
        error=EffectError("disk I/O error", kind="db_error", status_hint=500),
        work_ms=0.2,
        parks=[("io_wait", 0.6, "sqlite")],
    )
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def queue_heavy() -> list[SpanData]:
    # One effects worker: the cache lookup waits in the queue while the DB read runs.
    app, fake = _demo(workers_effects=1, export_job_depth=True)
    fake.on("db.get blog_post", result=_POST, work_ms=8.0)
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def park_heavy() -> list[SpanData]:
    app, fake = _demo()
    fake.on(
        "db.get blog_post",
        result=_POST,
        work_ms=0.5,
        parks=[("backpressure", 7.0, "db_pool", 4, 4), ("io_wait", 6.0, "sqlite")],
    )
    _cache_hit(fake)
    return await trace_requests(app, [("GET", "/blogs/posts/1")])


async def parallel_join_all() -> list[SpanData]:
    app, fake = _demo()
    fake.on("db.get blog_post", result=_POST, work_ms=0.4, parks=[("io_wait", 1.0, "sqlite")])
    comments = [c for c in SEED_COMMENTS.values() if c["post_id"] == "1"]
    fake.on("db.query comment", result=comments, work_ms=0.6, parks=[("io_wait", 1.5, "sqlite")])
    return await trace_requests(app, [("GET", "/blogs/posts/1/comments")])


async def _happy_debug() -> list[SpanData]:
    return await happy(debug_jobs=True)


async def _semconv_old() -> list[SpanData]:
    return await happy(semconv="old")


async def _semconv_new() -> list[SpanData]:
    return await happy(semconv="new")


async def _semconv_dup() -> list[SpanData]:
    return await happy(semconv="dup")


async def _happy() -> list[SpanData]:
    return await happy()


SCENARIOS: list[Scenario] = [
    Scenario(name="happy_200", run=_happy, description="post page, cache hit"),
    Scenario(name="cache_miss_200", run=cache_miss, description="miss falls through to the DB"),
    Scenario(name="not_found_404", run=not_found, description="unknown id: 404, root UNSET"),
    Scenario(name="db_failure_500", run=db_failure, description="required DB read fails"),
    Scenario(name="queue_heavy", run=queue_heavy, description="promoted job.queue_wait"),
    Scenario(name="park_heavy", run=park_heavy, description="promoted job.park spans"),
    Scenario(name="parallel_join_all", run=parallel_join_all, description="two DB reads"),
    Scenario(name="debug_jobs", run=_happy_debug, description="ZER_VER_DEBUG_JOBS=1"),
    Scenario(name="semconv_old", run=_semconv_old, description="ZER_VER_SEMCONV=old"),
    Scenario(name="semconv_new", run=_semconv_new, description="ZER_VER_SEMCONV=new"),
    Scenario(name="semconv_dup", run=_semconv_dup, description="ZER_VER_SEMCONV=dup"),
]
