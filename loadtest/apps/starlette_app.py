"""The peer contender: Starlette on uvicorn, untraced (``app``) and traced
(``create_traced_app``: opentelemetry-instrumentation-asgi, the SDK's
``BatchSpanProcessor`` and the official OTLP/HTTP protobuf exporter, configured
from the standard ``OTEL_EXPORTER_OTLP_*`` variables).

Routes:

* ``GET /items/{id}``: a small JSON body.
* ``GET /blogs/posts/{id}``: the work of zerver's demo route, written the way a
  Starlette user would: the author from an in-process TTL cache keyed by post id
  (60 s, zerver's default ``ZER_VER_CACHE_TTL_MS``), the post from SQLite in the
  thread pool, one query per request on a pool of 4 connections (WAL,
  ``synchronous=NORMAL``; zerver's SQLite default is 32, but this app measured
  no faster with 32 than with 4, and slower at p99, so it keeps its best); on a cache miss the
  author from SQLite too, then cached. It reads the file zerver uses
  (``ZER_VER_DB_PATH``, default ``zerver.sqlite3``) in zerver's format (one
  ``(key TEXT PRIMARY KEY, value TEXT NOT NULL)`` table per namespace, values as
  JSON) and seeds zerver's demo rows at start-up when they are missing. Answers
  are encoded with orjson, as zerver's ``Response.json`` does, so both serve the
  same bytes; an unknown id gives zerver's 404 body
  ``{"error":"post not found","key":"<id>"}``. ``?format=html`` renders HTML as
  the demo does. The traced app adds a CLIENT span per cache and DB call, with
  the attributes zerver's spans carry (``db.system=sqlite``, ...).

Run with ``uvicorn loadtest.apps.starlette_app:app --http h11`` or
``uvicorn --factory loadtest.apps.starlette_app:create_traced_app --http h11``.
"""

from __future__ import annotations

import contextlib
import html
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from zerver.demo import SEED_AUTHORS, SEED_COMMENTS, SEED_POSTS

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

__all__ = [
    "Blog",
    "OrjsonResponse",
    "SqlitePool",
    "TtlCache",
    "app",
    "create_app",
    "create_traced_app",
    "instrument",
    "post_html",
]

# zerver's variable and defaults for the database file, the cache TTL and size; the
# pool size this app does best with (see the module's docstring).
DB_PATH_ENV = "ZER_VER_DB_PATH"
DEFAULT_DB_PATH = "zerver.sqlite3"
POOL_SIZE = 4
CACHE_TTL_S = 60.0
CACHE_MAX_ENTRIES = 10_000
_BUSY_TIMEOUT_MS = 5000
_TABLES = ("author", "blog_post", "comment")

Row = dict[str, Any]


async def get_item(request: Request) -> JSONResponse:
    item_id = request.path_params["id"]
    return JSONResponse({"id": item_id, "name": f"item {item_id}"})


class OrjsonResponse(JSONResponse):
    """``application/json`` encoded with orjson (zerver's ``Response.json`` encoding)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class TtlCache:
    """A dict with expiry: entries live ``ttl_s``; when full, the oldest entry goes first."""

    def __init__(self, ttl_s: float = CACHE_TTL_S, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Any, float]] = {}

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if time.monotonic() >= expires:
            del self._entries[key]
            return None
        return value

    def set(self, key: str, value: Any) -> None:
        entries = self._entries
        if key not in entries and len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[key] = (value, time.monotonic() + self.ttl_s)


class SqlitePool:
    """A few sqlite3 connections on zerver's file; each query runs in Starlette's thread pool.

    ``get`` takes a free connection (waiting while all are busy), runs one
    ``SELECT`` with ``run_in_threadpool`` and gives the connection back once
    its thread has finished.
    """

    def __init__(self, path: str, size: int = POOL_SIZE) -> None:
        self.path = path
        self.size = size
        self._free: list[sqlite3.Connection] = []
        self._open: list[sqlite3.Connection] = []
        self._slots: anyio.Semaphore | None = None

    async def open(self) -> None:
        """Open the connections, create zerver's tables and seed the demo rows if missing."""
        self._open = await run_in_threadpool(self._connect_and_seed)
        self._free = list(self._open)
        self._slots = anyio.Semaphore(self.size)

    def close(self) -> None:
        for conn in self._open:
            conn.close()
        self._open, self._free, self._slots = [], [], None

    def _connect_and_seed(self) -> list[sqlite3.Connection]:
        conns: list[sqlite3.Connection] = []
        try:
            for i in range(self.size):
                conn = sqlite3.connect(
                    self.path,
                    check_same_thread=False,
                    isolation_level=None,
                    timeout=_BUSY_TIMEOUT_MS / 1000,
                )
                conns.append(conn)
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                if i == 0:
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            _seed(conns[0])
        except BaseException:
            for conn in conns:
                conn.close()
            raise
        return conns

    async def get(self, table: str, key: str) -> Any | None:
        """The JSON value under ``key`` in ``table`` (a name of ours, never user input), or None."""
        if self._slots is None:
            raise RuntimeError("the pool is not open")
        sql = f'SELECT value FROM "{table}" WHERE key = ?'
        async with self._slots:
            conn = self._free.pop()
            try:
                row = await run_in_threadpool(_fetch_one, conn, sql, key)
            finally:
                self._free.append(conn)
        return None if row is None else orjson.loads(row[0])


def _fetch_one(conn: sqlite3.Connection, sql: str, key: str) -> tuple[str] | None:
    row: tuple[str] | None = conn.execute(sql, (key,)).fetchone()
    return row


def _seed(conn: sqlite3.Connection) -> None:
    """zerver's tables, and the demo's rows when post 1 is missing (as zerver.demo seeds)."""
    for table in _TABLES:
        conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{table}" (key TEXT PRIMARY KEY, value TEXT NOT NULL)'
        )
    if conn.execute('SELECT 1 FROM "blog_post" WHERE key = ?', ("1",)).fetchone() is not None:
        return
    seeds: dict[str, Mapping[str, Row]] = {
        "author": SEED_AUTHORS,
        "blog_post": SEED_POSTS,
        "comment": SEED_COMMENTS,
    }
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, rows in seeds.items():
            conn.executemany(
                f'INSERT OR REPLACE INTO "{table}" (key, value) VALUES (?, ?)',
                [(key, orjson.dumps(value).decode()) for key, value in rows.items()],
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def post_html(post: Row, author: Row) -> str:
    e = html.escape
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{e(str(post.get('title', '')))}</title></head><body>"
        f"<article><h1>{e(str(post.get('title', '')))}</h1>"
        f"<p class='byline'>by {e(str(author.get('name', '')))}</p>"
        f"<div>{e(str(post.get('body', '')))}</div></article></body></html>"
    )


class Blog:
    """``GET /blogs/posts/{id}``: its database pool, its author cache, and (traced) its spans."""

    def __init__(self, db_path: str | None = None, tracer: Tracer | None = None) -> None:
        self._db_path = db_path
        self.cache = TtlCache()
        self.db: SqlitePool | None = None
        self._tracer = tracer
        self._client_kind: Any = None
        if tracer is not None:
            from opentelemetry.trace import SpanKind

            self._client_kind = SpanKind.CLIENT

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the pool (seeding the demo rows if missing) for the app's lifespan."""
        path = self._db_path or os.environ.get(DB_PATH_ENV, "").strip() or DEFAULT_DB_PATH
        self.db = SqlitePool(path)
        await self.db.open()
        try:
            yield
        finally:
            self.db.close()

    def _span(
        self, name: str, attributes: dict[str, str]
    ) -> contextlib.AbstractContextManager[Any]:
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer.start_as_current_span(
            name, kind=self._client_kind, attributes=attributes
        )

    async def _db_get(self, table: str, key: str) -> Any | None:
        assert self.db is not None, "the app's lifespan has not started"
        attrs = {"db.system": "sqlite", "db.operation": "get", "db.namespace": table, "db.key": key}
        with self._span(f"db.get {table}", attrs) as span:
            value = await self.db.get(table, key)
            if span is not None:
                span.set_attribute("db.response.returned_rows", 0 if value is None else 1)
            return value

    def _cache_get(self, key: str) -> Any | None:
        attrs = {"cache.system": "in_process", "cache.operation": "get"}
        with self._span("cache.get author_profile", attrs) as span:
            value = self.cache.get(key)
            if span is not None:
                span.set_attribute("cache.hit", value is not None)
            return value

    def _cache_set(self, key: str, value: Any) -> None:
        with self._span(
            "cache.set author_profile", {"cache.system": "in_process", "cache.operation": "set"}
        ):
            self.cache.set(key, value)

    async def get_post(self, request: Request) -> Response:
        post_id: str = request.path_params["id"]
        author = self._cache_get(post_id)
        post = await self._db_get("blog_post", post_id)
        if post is None:
            return OrjsonResponse({"error": "post not found", "key": post_id}, 404)
        if author is None:
            # Cache miss: the author from the database, then into the cache.
            author = await self._db_get("author", str(post.get("author_id", "")))
            if author is None:
                return OrjsonResponse(
                    {"error": "author not found", "key": str(post.get("author_id"))}, 404
                )
            self._cache_set(post_id, author)
        if request.query_params.get("format") == "html":
            return HTMLResponse(post_html(post, author))
        return OrjsonResponse({"post": post, "author": author})


def _routes(blog: Blog) -> list[Route]:
    return [Route("/items/{id}", get_item), Route("/blogs/posts/{id}", blog.get_post)]


def create_app(
    db_path: str | None = None,
    tracer: Tracer | None = None,
    on_shutdown: Callable[[], object] | None = None,
) -> Starlette:
    """The Starlette app; ``db_path`` defaults to ``ZER_VER_DB_PATH``, read at start-up.

    ``tracer`` (traced app) makes the spans of the cache and DB calls;
    ``on_shutdown`` runs when the lifespan ends.
    """
    blog = Blog(db_path, tracer)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            async with blog.running():
                yield
        finally:
            if on_shutdown is not None:
                on_shutdown()

    return Starlette(routes=_routes(blog), lifespan=lifespan)


app = create_app()


def create_traced_app() -> ASGIApp:
    """Starlette wrapped in ``OpenTelemetryMiddleware``, exporting to ``OTEL_EXPORTER_OTLP_*``
    (see :func:`instrument`)."""
    return instrument(
        lambda tracer, on_shutdown: create_app(tracer=tracer, on_shutdown=on_shutdown)
    )


def instrument(build: Callable[[Tracer, Callable[[], object]], Starlette]) -> ASGIApp:
    """``build(tracer, on_shutdown)`` wrapped in ``OpenTelemetryMiddleware``, exporting to
    ``OTEL_EXPORTER_OTLP_*``; the app must call ``on_shutdown`` when its lifespan ends.

    The sampler is the SDK's from ``OTEL_TRACES_SAMPLER`` / ``_ARG`` (parent-based
    always-on when unset). With ``OTEL_METRICS_EXPORTER=otlp`` the middleware also
    records its HTTP server metrics through an SDK ``MeterProvider`` exporting
    every ``OTEL_METRIC_EXPORT_INTERVAL`` with the SDK's OTLP/HTTP metric exporter.
    The providers are shut down (the batch processor drained, the last metrics
    exported) when the server's lifespan ends, so a SIGTERM'd server delivers
    what it buffered.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": "loadtest-starlette"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    shutdowns: list[Callable[[], object]] = [provider.shutdown]
    meter_provider = None
    if os.environ.get("OTEL_METRICS_EXPORTER", "none") == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        meter_provider = MeterProvider(
            [PeriodicExportingMetricReader(OTLPMetricExporter())], resource=resource
        )
        shutdowns.append(meter_provider.shutdown)

    def shutdown() -> None:
        for close in shutdowns:
            close()

    inner = build(provider.get_tracer(__name__), shutdown)
    return OpenTelemetryMiddleware(inner, tracer_provider=provider, meter_provider=meter_provider)
