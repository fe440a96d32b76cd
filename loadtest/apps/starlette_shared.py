"""The peer contender on shared backends: Starlette on uvicorn serving the demo's
``GET /blogs/posts/{id}`` from PostgreSQL and Redis, untraced (``create_app``) and
traced (``create_traced_app``: the OpenTelemetry SDK as in
:mod:`loadtest.apps.starlette_app`).

The same work as ``zerver demo`` with ``ZER_VER_DB_URL`` and ``ZER_VER_CACHE_URL``
(it reads those variables), written the way a Starlette user would:

* the post from PostgreSQL through psycopg 3's ``AsyncConnectionPool`` (4
  connections, zerver's default ``ZER_VER_DB_POOL_SIZE``; autocommit, ``$1``
  placeholders, psycopg's automatic prepared statements, as zerver's interpreter);
* the author from Redis through redis-py's asyncio client (a blocking pool of 16
  connections, the Redis cache interpreter's default), under zerver's key
  ``zerver:cache:author_profile:<post id>`` in zerver's form (``j`` then the JSON),
  so either server reads what the other cached;
* both at once (``asyncio.gather``), as the demo's step needs them in parallel;
  on a miss the author from PostgreSQL, then ``SET ... PX 60000`` (zerver's default
  ``ZER_VER_CACHE_TTL_MS``). A failed cache call counts as a miss, as the demo's
  optional ``CacheGet`` and ``CacheSet`` do.

Tables are zerver's (``(key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL)``,
values as JSON text), created and seeded with the demo's rows at start-up when
post 1 is missing. Answers are encoded with orjson, so both serve the same bytes;
an unknown id gives zerver's 404 body. The traced app adds a CLIENT span per cache
and database call with the attributes zerver's interpreters put on theirs
(``db.system.name``, ``db.collection.name``, ``db.query.text``, ``cache.hit``,
``server.address``, ...).

Run with ``ZER_VER_DB_URL=... ZER_VER_CACHE_URL=... uvicorn --factory
loadtest.apps.starlette_shared:create_app --http h11``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from zerver.demo import SEED_AUTHORS, SEED_COMMENTS, SEED_POSTS

from .starlette_app import OrjsonResponse, get_item, instrument, post_html

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer
    from psycopg_pool import AsyncConnectionPool
    from redis.asyncio import Redis

__all__ = ["SharedBlog", "create_app", "create_traced_app"]

DB_URL_ENV = "ZER_VER_DB_URL"
CACHE_URL_ENV = "ZER_VER_CACHE_URL"
DB_POOL_SIZE = 4
CACHE_POOL_SIZE = 16
CACHE_TTL_MS = 60_000
CACHE_TIMEOUT_S = 1.0
CACHE_PREFIX = "zerver:cache:author_profile:"
_JSON = b"j"  # zerver's tag of a JSON value (b"b" would be raw bytes)

Row = dict[str, Any]


def _get_sql(table: str) -> str:
    return f'SELECT value FROM "{table}" WHERE key = $1'


class SharedBlog:
    """``GET /blogs/posts/{id}``: its PostgreSQL pool, its Redis client, and (traced) its spans."""

    def __init__(
        self, db_url: str | None = None, cache_url: str | None = None, tracer: Tracer | None = None
    ) -> None:
        self._db_url = db_url
        self._cache_url = cache_url
        self.pool: AsyncConnectionPool[Any] | None = None
        self.redis: Redis | None = None
        self._tracer = tracer
        self._client_kind: Any = None
        self._db_attrs: dict[str, str | int] = {}
        self._cache_attrs: dict[str, str | int] = {}
        if tracer is not None:
            from opentelemetry.trace import SpanKind

            self._client_kind = SpanKind.CLIENT

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the pool and the client (creating and seeding the tables if missing)."""
        from psycopg import AsyncRawCursor
        from psycopg_pool import AsyncConnectionPool
        from redis.asyncio import BlockingConnectionPool, Redis

        db_url = self._db_url or os.environ[DB_URL_ENV]
        cache_url = self._cache_url or os.environ[CACHE_URL_ENV]
        db, cache = urlsplit(db_url), urlsplit(cache_url)
        self._db_attrs = {
            "db.system.name": "postgresql",
            "db.namespace": db.path.lstrip("/"),
            "server.address": db.hostname or "",
            "server.port": db.port or 5432,
        }
        self._cache_attrs = {
            "db.system.name": "redis",
            "cache.system": "redis",
            "db.namespace": cache.path.lstrip("/") or "0",
            "server.address": cache.hostname or "",
            "server.port": cache.port or 6379,
        }
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            db_url,
            min_size=DB_POOL_SIZE,
            max_size=DB_POOL_SIZE,
            kwargs={"autocommit": True, "cursor_factory": AsyncRawCursor},
            open=False,
        )
        await pool.open(wait=True, timeout=10)
        connections = BlockingConnectionPool.from_url(
            cache_url,
            max_connections=CACHE_POOL_SIZE,
            timeout=None,
            socket_timeout=CACHE_TIMEOUT_S,
            socket_connect_timeout=CACHE_TIMEOUT_S,
        )
        client = Redis(connection_pool=connections)
        try:
            await _seed(pool)
            await client.ping()
            self.pool, self.redis = pool, client
            yield
        finally:
            self.pool = self.redis = None
            await client.aclose(close_connection_pool=True)
            await pool.close()

    def _span(
        self, name: str, attributes: Mapping[str, str | int]
    ) -> contextlib.AbstractContextManager[Any]:
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer.start_as_current_span(
            name, kind=self._client_kind, attributes=dict(attributes)
        )

    async def _db_get(self, table: str, key: str) -> Any | None:
        assert self.pool is not None, "the app's lifespan has not started"
        sql = _get_sql(table)
        attrs = {
            **self._db_attrs,
            "db.collection.name": table,
            "db.operation.name": "SELECT",
            "db.query.text": sql,
        }
        with self._span(f"db.get {table}", attrs) as span:
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql, (key,))
                row = await cur.fetchone()
            if span is not None:
                span.set_attribute("db.response.returned_rows", 0 if row is None else 1)
        return None if row is None else orjson.loads(row[0])

    async def _cache_get(self, post_id: str) -> Any | None:
        from redis.exceptions import RedisError

        assert self.redis is not None, "the app's lifespan has not started"
        attrs = {**self._cache_attrs, "cache.operation": "get"}
        with self._span("cache.get author_profile", attrs) as span:
            try:
                raw = await self.redis.get(CACHE_PREFIX + post_id)
            except RedisError:
                raw = None  # optional, as the demo's CacheGet: a failure is a miss
            if span is not None:
                span.set_attribute("cache.hit", raw is not None)
        return None if raw is None or raw[:1] != _JSON else orjson.loads(raw[1:])

    async def _cache_set(self, post_id: str, author: Row) -> None:
        from redis.exceptions import RedisError

        assert self.redis is not None, "the app's lifespan has not started"
        attrs = {**self._cache_attrs, "cache.operation": "set"}
        with self._span("cache.set author_profile", attrs), contextlib.suppress(RedisError):
            await self.redis.set(
                CACHE_PREFIX + post_id, _JSON + orjson.dumps(author), px=CACHE_TTL_MS
            )

    async def get_post(self, request: Request) -> Response:
        post_id: str = request.path_params["id"]
        author, post = await asyncio.gather(
            self._cache_get(post_id), self._db_get("blog_post", post_id)
        )
        if post is None:
            return OrjsonResponse({"error": "post not found", "key": post_id}, 404)
        if author is None:
            # Cache miss: the author from the database, then into the cache.
            author = await self._db_get("author", str(post.get("author_id", "")))
            if author is None:
                return OrjsonResponse(
                    {"error": "author not found", "key": str(post.get("author_id"))}, 404
                )
            await self._cache_set(post_id, author)
        if request.query_params.get("format") == "html":
            return HTMLResponse(post_html(post, author))
        return OrjsonResponse({"post": post, "author": author})


async def _seed(pool: AsyncConnectionPool[Any]) -> None:
    """zerver's tables, and the demo's rows when post 1 is missing (as zerver.demo seeds)."""
    seeds: dict[str, Mapping[str, Row]] = {
        "author": SEED_AUTHORS,
        "blog_post": SEED_POSTS,
        "comment": SEED_COMMENTS,
    }
    async with pool.connection() as conn:
        for table in seeds:
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{table}" '
                '(key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL)'
            )
        cur = await conn.execute(_get_sql("blog_post"), ("1",))
        if await cur.fetchone() is not None:
            return
        async with conn.transaction():
            for table, rows in seeds.items():
                for key, value in rows.items():
                    await conn.execute(
                        f'INSERT INTO "{table}" (key, value) VALUES ($1, $2) '
                        "ON CONFLICT (key) DO NOTHING",
                        (key, orjson.dumps(value).decode()),
                    )


def _build(tracer: Tracer | None, on_shutdown: Callable[[], object] | None) -> Starlette:
    blog = SharedBlog(tracer=tracer)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            async with blog.running():
                yield
        finally:
            if on_shutdown is not None:
                on_shutdown()

    routes = [Route("/items/{id}", get_item), Route("/blogs/posts/{id}", blog.get_post)]
    return Starlette(routes=routes, lifespan=lifespan)


def create_app() -> Starlette:
    """The untraced app; ``ZER_VER_DB_URL`` and ``ZER_VER_CACHE_URL`` are read at start-up."""
    return _build(None, None)


def create_traced_app() -> ASGIApp:
    """The app with the OpenTelemetry SDK (see :func:`loadtest.apps.starlette_app.instrument`)."""
    return instrument(_build)
