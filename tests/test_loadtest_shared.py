"""The load test's contenders on shared backends: chosen only by name, started with
servers of their own, and the Starlette peer serving zerver's demo bytes from the
same PostgreSQL tables and the same Redis keys."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind as OtelSpanKind
from pg_server import PgServer, pg_server, require_postgres  # noqa: F401 - the session fixture
from redis_server import RedisServer, redis_server, require_redis  # noqa: F401 - the fixture

import zerver
from loadtest._contenders import CONTENDERS, SHARED, Contender, by_name
from loadtest._runner import _server_env, start_backends
from loadtest.apps import starlette_shared
from zerver.demo import SEED_AUTHORS, SEED_POSTS
from zerver.demo import create_app as create_demo_app
from zerver.testing import AppClient

TARGETS = (
    "/blogs/posts/1",  # a cache miss: the author from PostgreSQL, then into Redis
    "/blogs/posts/1",  # a hit
    "/blogs/posts/2",
    "/blogs/posts/1?format=html",
    "/blogs/posts/nope",
)


def test_shared_contenders_run_only_when_named() -> None:
    names = [c.name for c in SHARED]
    assert names == [
        "starlette-pg-redis",
        "starlette-pg-redis-otel",
        "zerver-pg-redis",
        "zerver-pg-redis-otlp",
    ]
    assert not set(names) & {c.name for c in CONTENDERS}
    assert by_name([]) == CONTENDERS  # --quick and CI's full run never start them
    assert [c.name for c in by_name(["zerver-pg-redis-otlp", "zerver"])] == [
        "zerver",
        "zerver-pg-redis-otlp",
    ]
    assert all(c.backends == ("postgresql", "redis") for c in SHARED)
    assert all(c.workloads[0].route == "/blogs/posts/{id}" for c in SHARED)
    with pytest.raises(ValueError, match="zerver-pg-redis-otlp"):
        by_name(["zerver-pg-mysql"])


def test_a_shared_contender_gets_its_servers_urls_and_no_sqlite_path(tmp_path: Path) -> None:
    contender = by_name(["zerver-pg-redis-otlp"])[0]
    urls = {"db_url": "postgresql://u:p@127.0.0.1:1/db", "cache_url": "redis://127.0.0.1:2/0"}
    env = _server_env(contender, "http://127.0.0.1:3", str(tmp_path), backends=urls)
    assert env["ZER_VER_DB_URL"] == urls["db_url"]
    assert env["ZER_VER_CACHE_URL"] == env["ZER_VER_BROKER_URL"] == urls["cache_url"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:3"
    # zerver refuses ZER_VER_DB_URL and ZER_VER_DB_PATH naming two databases.
    assert "ZER_VER_DB_PATH" not in env
    sqlite = _server_env(by_name(["zerver"])[0], "http://r", str(tmp_path))
    assert sqlite["ZER_VER_DB_PATH"].endswith("loadtest.sqlite3")


def test_start_backends_starts_servers_of_its_own_and_removes_them() -> None:
    require_postgres()
    require_redis()
    import psycopg
    import redis

    contender = by_name(["starlette-pg-redis"])[0]
    with start_backends(contender) as urls:
        with psycopg.connect(urls["db_url"], connect_timeout=10) as conn:
            assert conn.execute(b"SELECT 1").fetchone() == (1,)
        client = redis.Redis.from_url(urls["cache_url"])
        try:
            assert client.ping() is True
        finally:
            client.close()
    with pytest.raises(psycopg.OperationalError):  # stopped: nothing listens there now
        psycopg.connect(urls["db_url"], connect_timeout=2)
    odd = Contender(name="odd", title="odd", argv=("true",), backends=("mysql",))
    with pytest.raises(RuntimeError, match="unknown backend 'mysql'"), start_backends(odd):
        pass


@pytest.fixture
def backends(
    pg_server: PgServer,  # noqa: F811 - the fixture imported above
    redis_server: RedisServer,  # noqa: F811 - the fixture imported above
) -> Iterator[tuple[str, str, str]]:
    """A schema of its own, and two empty Redis databases (one per server under test)."""
    import redis

    base = f"redis://{redis_server.host}:{redis_server.port}"
    urls = (f"{base}/8", f"{base}/9")
    for url in urls:
        redis.Redis.from_url(url).flushdb()
    try:
        yield pg_server.new_schema(), *urls
    finally:
        for url in urls:
            client = redis.Redis.from_url(url)
            client.flushdb()
            client.close()


async def _starlette(
    db_url: str, cache_url: str, provider: TracerProvider | None = None
) -> list[tuple[int, bytes, str]]:
    """The peer's answers to :data:`TARGETS` (in process; traced with ``provider``)."""
    from starlette.types import ASGIApp

    tracer = provider.get_tracer("test") if provider is not None else None
    blog_app = starlette_shared._build(tracer, None)
    app: ASGIApp = blog_app
    if provider is not None:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        app = OpenTelemetryMiddleware(blog_app, tracer_provider=provider)
    out: list[tuple[int, bytes, str]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZER_VER_DB_URL", db_url)
        mp.setenv("ZER_VER_CACHE_URL", cache_url)
        async with (
            blog_app.router.lifespan_context(blog_app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            ) as client,
        ):
            for target in TARGETS:
                r = await client.get(target)
                out.append((r.status_code, r.content, r.headers.get("content-type", "")))
    return out


async def _zerver(db_url: str, cache_url: str) -> list[tuple[int, bytes, str]]:
    settings = zerver.load_settings({"ZER_VER_DB_URL": db_url, "ZER_VER_CACHE_URL": cache_url})
    app = create_demo_app(settings=settings)
    out: list[tuple[int, bytes, str]] = []
    async with AppClient(app) as client:
        for target in TARGETS:
            r = await client.get(target)
            ctype = next((v for k, v in r.headers if k == "content-type"), "")
            out.append((r.status, r.body, ctype))
    return out


def test_starlette_peer_serves_the_demo_bytes_from_the_same_tables(
    backends: tuple[str, str, str],
) -> None:
    db_url, starlette_cache, zerver_cache = backends
    # Starlette first: it creates zerver's tables and seeds them; zerver finds them seeded.
    peer = asyncio.run(_starlette(db_url, starlette_cache))
    ours = asyncio.run(_zerver(db_url, zerver_cache))
    assert peer == ours
    assert [status for status, _, _ in peer] == [200, 200, 200, 200, 404]
    assert (
        peer[0][1]
        == zerver.Response.json({"post": SEED_POSTS["1"], "author": SEED_AUTHORS["ada"]}).body
    )
    assert peer[4][1] == b'{"error":"post not found","key":"nope"}'
    # The same Redis entries, in the same form.
    import redis

    keys = []
    for url in (starlette_cache, zerver_cache):
        client = redis.Redis.from_url(url)
        try:
            keys.append(sorted(client.keys("*")))
            assert (
                client.get("zerver:cache:author_profile:1")
                == b"j" + zerver.Response.json(SEED_AUTHORS["ada"]).body
            )
        finally:
            client.close()
    assert (
        keys[0] == keys[1] == [b"zerver:cache:author_profile:1", b"zerver:cache:author_profile:2"]
    )


def test_traced_peer_makes_a_span_per_cache_and_db_call(backends: tuple[str, str, str]) -> None:
    db_url, cache_url, _ = backends
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    answers = asyncio.run(_starlette(db_url, cache_url, provider))
    provider.shutdown()
    assert [status for status, _, _ in answers] == [200, 200, 200, 200, 404]
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == len(TARGETS)

    def calls(root: ReadableSpan) -> list[tuple[str, object]]:
        assert root.context is not None
        return sorted(
            (
                s.name,
                (s.attributes or {}).get("cache.hit", (s.attributes or {}).get("db.system.name")),
            )
            for s in spans
            if s.kind == OtelSpanKind.CLIENT
            and s.parent is not None
            and s.parent.span_id == root.context.span_id
        )

    assert calls(roots[0]) == [
        ("cache.get author_profile", False),
        ("cache.set author_profile", "redis"),
        ("db.get author", "postgresql"),
        ("db.get blog_post", "postgresql"),
    ]
    assert calls(roots[1]) == [
        ("cache.get author_profile", True),
        ("db.get blog_post", "postgresql"),
    ]
    [db_get] = [
        s
        for s in spans
        if s.name == "db.get blog_post"
        and s.parent
        and roots[1].context
        and s.parent.span_id == roots[1].context.span_id
    ]
    attrs = dict(db_get.attributes or {})
    assert attrs["db.query.text"] == 'SELECT value FROM "blog_post" WHERE key = $1'
    assert attrs["db.collection.name"] == "blog_post"
    assert "s3cret-pw" not in repr(attrs)
