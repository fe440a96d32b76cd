"""What only the PostgreSQL interpreter does: its settings, its span attributes, its
failures (constraints, statement and effect timeouts, a server that goes away and
comes back) and the password that never shows. The effects' results are tested
for every database in test_interp_db.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from pg_server import PgServer, pg_server  # noqa: F401 - the session fixture
from support import served

from zerver import (
    App,
    ConfigError,
    Context,
    DbGet,
    DbPut,
    Done,
    Join,
    Need,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver.core._clock import MonotonicClock
from zerver.core._effects import Effect
from zerver.core._errors import EffectError
from zerver.runtime._park import JobContext
from zerver.runtime.interpreters import PostgresInterpreter, SqliteInterpreter
from zerver.testing import AppClient, InMemorySpanSink, RecordCapture, capture_logs
from zerver.trace._records import JobState

pytestmark = pytest.mark.anyio

A: Slot[Any] = Slot("a")
B: Slot[Any] = Slot("b")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:  # noqa: F811 - the fixture imported above
    """A URL whose tables are the test's own (an empty schema)."""
    return pg_server.new_schema()


def make_job(effect: Effect) -> JobContext:
    state = JobState(
        index=0, kind="effect", name=effect.span_name, queue="effects", step_index=0, effect=effect
    )
    return JobContext(state, MonotonicClock())


async def run(interp: PostgresInterpreter, effect: Effect) -> tuple[Any, JobContext]:
    job = make_job(effect)
    return await interp.perform(effect, job), job


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition()`` holds (a job's hops through the
    queues are callbacks, not tasks); bounded: 10 s."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


@contextlib.contextmanager
def table_locked(url: str, table: str) -> Iterator[None]:
    """Another session holds ``table`` in EXCLUSIVE mode: writes wait for it."""
    with psycopg.connect(url, connect_timeout=10) as blocker:
        blocker.execute(f'LOCK TABLE "{table}" IN EXCLUSIVE MODE'.encode())
        yield
        blocker.commit()


# -- settings ----------------------------------------------------------------------


def test_db_url_chooses_the_database() -> None:
    pg = App(
        "a", settings=load_settings({"ZER_VER_DB_URL": "postgresql://u:pw@db.example:6543/blog"})
    )
    db = pg.interpreters["db"]
    assert isinstance(db, PostgresInterpreter)
    assert db.url == "postgresql://u:***@db.example:6543/blog"
    assert "pw" not in repr(db)
    assert db.span_attributes == {
        "db.system.name": "postgresql",
        "db.system": "postgresql",
        "db.namespace": "blog",
        "server.address": "db.example",
        "server.port": 6543,
    }
    lite = App("b", settings=load_settings({"ZER_VER_DB_URL": "sqlite:///:memory:"}))
    lite_db = lite.interpreters["db"]
    assert isinstance(lite_db, SqliteInterpreter) and lite_db.path == ":memory:"
    same = load_settings({"ZER_VER_DB_URL": "sqlite:///x.db", "ZER_VER_DB_PATH": "x.db"})
    assert same.db_backend == ("sqlite", "x.db")
    assert load_settings({}).db_backend == ("sqlite", "zerver.sqlite3")
    sized = App(
        "c",
        settings=load_settings({"ZER_VER_DB_URL": "postgres://h/d", "ZER_VER_DB_POOL_SIZE": "7"}),
    )
    assert sized.interpreters["db"].pool_size == 7  # type: ignore[attr-defined]
    # Unset, each backend has its own default: PostgreSQL's connections are scarce.
    assert lite_db.pool_size == SqliteInterpreter.default_pool_size == 32
    pg_default = App("d", settings=load_settings({"ZER_VER_DB_URL": "postgres://h/d"}))
    assert pg_default.interpreters["db"].pool_size == PostgresInterpreter.default_pool_size == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@h/db",
        "postgresql://u:hunter2@h:port/db",
        "postgresql://u:hunter2@h:99999/db",
        "sqlite://relative.db",
        "sqlite:///",
        "hunter2",
        "postgresql:",
    ],
)
def test_bad_db_url_is_a_config_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"ZER_VER_DB_URL": url})
    message = str(info.value)
    assert message.startswith("ZER_VER_DB_URL=")
    assert "accepted: postgresql://" in message
    assert "\n" not in message
    if "://" in url:
        assert "hunter2" not in message


@pytest.mark.parametrize(
    ("url", "path"),
    [("postgresql://u:hunter2@h/db", "x.db"), ("sqlite:///a.db", "b.db")],
)
def test_db_url_and_path_naming_two_databases_is_an_error(url: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"ZER_VER_DB_URL": url, "ZER_VER_DB_PATH": path})
    message = str(info.value)
    assert "ZER_VER_DB_URL=" in message and f"ZER_VER_DB_PATH={path!r}" in message
    assert "hunter2" not in message


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        PostgresInterpreter("postgresql://h/d", pool_size=0)
    with pytest.raises(ValueError, match="connect_timeout_s"):
        PostgresInterpreter("postgresql://h/d", connect_timeout_s=0)
    with pytest.raises(ValueError, match="not a postgresql") as info:
        PostgresInterpreter("mysql://u:hunter2@h/d")
    assert "hunter2" not in str(info.value)


# -- spans -------------------------------------------------------------------------


@step(reads=[A])
def show(ctx: Context) -> Done:
    return Done(Response.json({"a": ctx.optional(A), "b": ctx.optional(B)}))


@step
def load(ctx: Context) -> Need:
    key = ctx.params["id"]
    return Need(DbGet(table="blog_post", key=key, slot=A), then=show)


@step
def save(ctx: Context) -> Need:
    key = ctx.params["id"]
    return Need(DbPut(table="blog_post", key=key, value={"id": key}), then=show)


@step
def healthz(ctx: Context) -> Done:
    return Done(Response.json({"status": "ok"}))


def blog_app(url: str, **env: str) -> tuple[App, InMemorySpanSink, RecordCapture]:
    app = App("pg", settings=load_settings({"ZER_VER_DB_URL": url, **env}))
    app.get("/posts/{id}", load)
    app.put("/posts/{id}", save)
    app.get("/healthz", healthz)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    cap = RecordCapture()
    app.subscribe(cap)
    return app, sink, cap


async def test_effect_spans_follow_the_database_conventions(
    pg_server: PgServer,  # noqa: F811 - the fixture imported above
) -> None:
    url = pg_server.new_schema()
    app, sink, _cap = blog_app(url)
    async with AppClient(app) as c:
        assert (await c.request("PUT", "/posts/p'1")).status == 200
        r = await c.get("/posts/p'1")
    assert r.status == 200 and r.body == b'{"a":{"id":"p\'1"},"b":null}'
    [put] = sink.by_name("db.put blog_post")
    [get] = sink.by_name("db.get blog_post")
    database = pg_server.database
    common = {
        "db.system.name": "postgresql",
        "db.system": "postgresql",
        "db.namespace": database,
        "db.collection.name": "blog_post",
        "server.address": "127.0.0.1",
        "server.port": pg_server.port,
        "db.operation": "get",
        "db.key": "p'1",
        "db.response.returned_rows": 1,
    }
    assert {k: get.attributes[k] for k in common} == common
    assert get.attributes["db.operation.name"] == "SELECT"
    assert get.attributes["db.query.text"] == 'SELECT value FROM "blog_post" WHERE key = $1'
    assert put.attributes["db.operation.name"] == "INSERT"
    assert put.attributes["db.query.text"] == (
        'INSERT INTO "blog_post" (key, value) VALUES ($1, $2) '
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
    )
    for span in sink.spans:  # parameters and the password never reach a span
        for value in span.attributes.values():
            assert pg_server.password not in str(value)
            assert "p'1" not in str(value) or value in ("p'1", "/posts/p'1", "/posts/p%271")


async def test_query_text_has_placeholders_only(pg_url: str) -> None:
    from zerver import DbQuery

    interp = PostgresInterpreter(pg_url)
    try:
        await interp.put_many("post", {"p1": {"author": "o'hara", "n": 3}})
        rows, job = await run(
            interp, DbQuery(table="post", where={"author": "o'hara"}, order_by="-n", limit=5)
        )
    finally:
        await interp.aclose()
    assert rows == [{"author": "o'hara", "n": 3}]
    meta = job.state.result_meta
    assert meta is not None
    text = meta["db.query.text"]
    assert text.startswith('SELECT value FROM "post" WHERE (value::jsonb #> $1) = $2 ORDER BY ')
    assert text.endswith(", key LIMIT $4")
    assert "hara" not in text and "author" not in text and "5" not in text
    assert meta["db.operation.name"] == "SELECT"
    assert meta["db.collection.name"] == "post"


# -- the pool ----------------------------------------------------------------------


async def test_full_pool_parks_the_second_request_with_exact_limits(pg_url: str) -> None:
    app, _sink, cap = blog_app(pg_url, ZER_VER_DB_POOL_SIZE="1")
    db = app.interpreters["db"]
    assert isinstance(db, PostgresInterpreter) and db.limiter.limit == 1
    async with AppClient(app) as c:
        assert (await c.request("PUT", "/posts/seed")).status == 200
        responses: list[int] = []

        async def put(key: str) -> None:
            responses.append((await c.request("PUT", f"/posts/{key}")).status)

        # The first request holds the only connection, waiting for the table lock.
        with contextlib.ExitStack() as held:
            held.enter_context(table_locked(pg_url, "blog_post"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(put, "one")
                await until(lambda: db.limiter.in_use == 1)
                tg.start_soon(put, "two")
                await until(lambda: db.limiter.waiting == 1)
                held.close()
    assert responses == [200, 200]
    puts = [j for rec in list(cap.records)[-2:] for j in rec.jobs if j.name == "db.put blog_post"]
    assert len(puts) == 2
    first, second = sorted(puts, key=lambda j: len(j.park_episodes))
    assert [p.cause for p in first.park_episodes] == ["io_wait"]
    backpressure, io_wait = second.park_episodes
    assert (backpressure.cause, backpressure.token) == ("backpressure", "db_pool")
    assert (backpressure.limit_current, backpressure.limit_max) == (1, 1)
    assert (io_wait.cause, io_wait.token) == ("io_wait", "postgresql")
    assert backpressure.resume_ts is not None and io_wait.park_ts >= backpressure.resume_ts


# -- failures ----------------------------------------------------------------------


async def test_constraint_violation_is_db_constraint(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            b'CREATE TABLE "strict" (key TEXT COLLATE "C" PRIMARY KEY, '
            b"value TEXT NOT NULL CHECK (length(value) < 8))"
        )
    interp = PostgresInterpreter(pg_url, pool_size=1)
    try:
        with pytest.raises(EffectError) as info:
            await run(interp, DbPut(table="strict", key="k", value="far too long"))
        # The connection survives a refused statement.
        await run(interp, DbPut(table="strict", key="k", value="ok"))
        assert (await run(interp, DbGet(table="strict", key="k")))[0] == "ok"
    finally:
        await interp.aclose()
    assert info.value.kind == "db_constraint"
    assert info.value.retryable is False
    assert info.value.status_hint == 500
    assert "strict" in str(info.value)


async def test_other_errors_are_db_error_not_retryable(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute(b'CREATE TABLE "legacy" (x INTEGER)')
    interp = PostgresInterpreter(pg_url)
    try:
        with pytest.raises(EffectError) as info:
            await run(interp, DbPut(table="legacy", key="k", value=1))
    finally:
        await interp.aclose()
    assert info.value.kind == "db_error"
    assert info.value.retryable is False


async def test_statement_timeout_is_db_timeout(pg_url: str) -> None:
    # pg_url ends with its options (the schema's search_path): one more setting.
    interp = PostgresInterpreter(pg_url + "%20-cstatement_timeout%3D100", pool_size=1)
    try:
        await run(interp, DbPut(table="t", key="k", value=1))
        with table_locked(pg_url, "t"), pytest.raises(EffectError) as info:
            await run(interp, DbPut(table="t", key="k", value=2))
        assert (await run(interp, DbGet(table="t", key="k")))[0] == 1
    finally:
        await interp.aclose()
    assert info.value.kind == "db_timeout"
    assert info.value.retryable is True
    assert info.value.status_hint == 504


async def test_effect_timeout_ends_the_job_and_frees_the_connection(pg_url: str) -> None:
    app, _sink, cap = blog_app(pg_url, ZER_VER_DB_POOL_SIZE="1")
    db = app.interpreters["db"]
    assert isinstance(db, PostgresInterpreter)

    @step
    def impatient(ctx: Context) -> Need:
        return Need(DbPut(table="blog_post", key="x", value=1, timeout_ms=200), then=show)

    app.put("/impatient", impatient)
    async with AppClient(app) as c:
        assert (await c.request("PUT", "/posts/seed")).status == 200
        with table_locked(pg_url, "blog_post"):
            with anyio.fail_after(10):  # bounded: the effect's 200 ms, then the answer
                r = await c.request("PUT", "/impatient")
            assert r.status == 504
            [job] = [j for j in cap.last.jobs if j.name == "db.put blog_post"]
            assert job.error_type == "timeout"
        # The statement was cancelled on the server; its connection is not reused.
        await until(lambda: db.limiter.in_use == 0)
        assert (await c.request("PUT", "/posts/after")).status == 200
        assert (await c.get("/posts/after")).body == b'{"a":{"id":"after"},"b":null}'


async def test_unreachable_server_fails_at_once_with_the_url_masked() -> None:
    with socket_closed_port() as port:
        url = f"postgresql://zerver:hunter2@127.0.0.1:{port}/nowhere"
        interp = PostgresInterpreter(url)
        try:
            with anyio.fail_after(10), pytest.raises(EffectError) as info:
                await run(interp, DbGet(table="t", key="k"))
        finally:
            await interp.aclose()
    assert info.value.kind == "db_unavailable"
    assert info.value.retryable is True
    assert info.value.status_hint == 503
    message = str(info.value)
    assert f"postgresql://zerver:***@127.0.0.1:{port}/nowhere" in message
    assert "hunter2" not in message and "\n" not in message
    assert interp.limiter.in_use == 0


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 where nothing listens (bound, never listening)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


async def test_server_lost_mid_load_fails_fast_and_recovers(
    pg_server: PgServer,  # noqa: F811 - the fixture imported above
) -> None:
    url = pg_server.new_schema()
    app, _sink, cap = blog_app(url, ZER_VER_DB_POOL_SIZE="4")
    statuses: list[int] = []
    try:
        with capture_logs() as logs:
            async with (
                served(app) as base,
                httpx.AsyncClient(base_url=base, timeout=15) as client,
            ):

                async def load_batch(n: int) -> None:
                    async def one(i: int) -> None:
                        r = await client.put(f"/posts/k{i % 7}")
                        statuses.append(r.status_code)

                    async with anyio.create_task_group() as tg:
                        for i in range(n):
                            tg.start_soon(one, i)

                await load_batch(20)
                assert statuses == [200] * 20
                statuses.clear()
                # Mid-load: requests in flight while the server goes away.
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(load_batch, 40)
                        await anyio.to_thread.run_sync(pg_server.stop, "immediate")
                assert set(statuses) <= {200, 503}
                statuses.clear()
                # Down: each effect fails at once, the other routes keep serving.
                with anyio.fail_after(10):
                    for i in range(5):
                        r = await client.get(f"/posts/k{i}")
                        statuses.append(r.status_code)
                        assert (await client.get("/healthz")).status_code == 200
                assert statuses == [503] * 5
                down = [
                    j for rec in list(cap.records)[-10:] for j in rec.jobs if j.effect is not None
                ]
                assert {j.error_type for j in down} == {"db_unavailable"}
                statuses.clear()
                # Back: the next effects succeed on new connections.
                await anyio.to_thread.run_sync(pg_server.start)
                with anyio.fail_after(10):
                    await load_batch(20)
                assert statuses == [200] * 20
                r = await client.get("/posts/k3")
                assert r.status_code == 200 and r.json() == {"a": {"id": "k3"}, "b": None}
    finally:
        pg_server.start()  # for the tests after this one, whatever happened
    for entry in logs:
        assert pg_server.password not in repr(entry)


async def test_retries_follow_the_effect_policy(
    pg_server: PgServer,  # noqa: F811 - the fixture imported above
) -> None:
    from zerver import RetryPolicy

    url = pg_server.new_schema()
    app, _sink, cap = blog_app(url)

    @step
    def patient(ctx: Context) -> Need:
        policy = RetryPolicy(max_attempts=3, backoff_ms=1, max_backoff_ms=2)
        return Need(DbGet(table="t", key="k", slot=A, retry=policy), join=Join.ALL, then=show)

    app.get("/patient", patient)
    try:
        async with AppClient(app) as c:
            await anyio.to_thread.run_sync(pg_server.stop, "fast")
            with anyio.fail_after(10):
                r = await c.get("/patient")
    finally:
        pg_server.start()
    assert r.status == 503
    [job] = [j for j in cap.last.jobs if j.name == "db.get t"]
    assert job.attempts == 3
    assert [retry.reason for retry in job.retries] == ["db_unavailable"] * 2
    assert job.error_type == "db_unavailable"


async def test_table_dropped_meanwhile_is_retryable_and_created_again(pg_url: str) -> None:
    interp = PostgresInterpreter(pg_url, pool_size=1)
    try:
        await run(interp, DbPut(table="t", key="k", value=1))
        with psycopg.connect(pg_url) as conn:
            conn.execute(b'DROP TABLE "t"')
        with pytest.raises(EffectError) as info:
            await run(interp, DbGet(table="t", key="k"))
        assert (await run(interp, DbGet(table="t", key="k")))[0] is None
    finally:
        await interp.aclose()
    assert info.value.kind == "db_error"
    assert info.value.retryable is True


async def test_nothing_connects_before_the_first_db_effect() -> None:
    with socket_closed_port() as port:
        app, _sink, cap = blog_app(f"postgresql://zerver:hunter2@127.0.0.1:{port}/blog")
        async with AppClient(app) as c:
            assert (await c.get("/healthz")).status == 200  # the app starts, serves
            r = await c.get("/posts/1")  # the first db effect tries, and fails at once
    assert r.status == 503
    [job] = [j for j in cap.last.jobs if j.name == "db.get blog_post"]
    assert job.error_type == "db_unavailable"
    assert "hunter2" not in (job.error_message or "")


def test_missing_server_binaries_skip_or_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    import pg_server as module

    monkeypatch.setattr(module, "find_bindir", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Debian package postgresql"):
        module.require_postgres()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        module.require_postgres()


def test_a_missing_driver_is_a_start_up_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"zerver\[postgres\]") as info:
        PostgresInterpreter("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(info.value)
