"""The ``db`` effects, one suite over every database: SQLite (a file and a shared
in-memory database) and PostgreSQL (a real server started by the test run).

Each test gets an empty database. What only one backend does (SQLite's WAL
file, PostgreSQL's span attributes and faults) is tested in that backend's own
file; here the results, the park records and the refusals must be the same.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from pg_server import PgServer, pg_server  # noqa: F401 - the session fixture

from zerver.core._clock import MonotonicClock
from zerver.core._effects import CacheGet, DbDel, DbGet, DbPut, DbQuery, Effect
from zerver.core._errors import EffectError
from zerver.runtime._park import JobContext
from zerver.runtime.interpreters import PostgresInterpreter, SqliteInterpreter
from zerver.trace._records import JobState

pytestmark = pytest.mark.anyio

Interp = SqliteInterpreter | PostgresInterpreter


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Backend:
    """An interpreter under test and what differs between databases."""

    name: str
    interp: Interp
    #: The ``io_wait`` token of its statements.
    token: str
    #: ``with lock(table):`` holds the table's write lock from another connection
    #: (None where nothing outside the process can: SQLite in memory).
    lock: Callable[[str], contextlib.AbstractContextManager[None]] | None


@contextlib.contextmanager
def _sqlite_lock(path: Path, _table: str) -> Iterator[None]:
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield
        blocker.execute("COMMIT")
    finally:
        blocker.close()


@contextlib.contextmanager
def _pg_lock(url: str, table: str) -> Iterator[None]:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as blocker:
        blocker.execute(f'LOCK TABLE "{table}" IN EXCLUSIVE MODE'.encode())
        yield
        blocker.commit()


def make_backend(kind: str, where: Path | str, pool_size: int = 2) -> Backend:
    if kind == "postgresql":
        assert isinstance(where, str)
        url = where
        return Backend(
            kind,
            PostgresInterpreter(url, pool_size=pool_size),
            "postgresql",
            lambda table: _pg_lock(url, table),
        )
    if kind == "sqlite_file":
        assert isinstance(where, Path)
        path = where
        return Backend(
            kind,
            SqliteInterpreter(path, pool_size=pool_size),
            "sqlite",
            lambda table: _sqlite_lock(path, table),
        )
    return Backend(kind, SqliteInterpreter(":memory:", pool_size=pool_size), "sqlite", None)


@pytest.fixture(params=["sqlite_file", "sqlite_memory", "postgresql"])
def db_backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_place(db_backend_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where the test's empty database lives: a file path, or a PostgreSQL URL."""
    if db_backend_kind == "postgresql":
        server: PgServer = request.getfixturevalue("pg_server")
        return server.new_schema()
    return tmp_path / "app.sqlite3"


@pytest.fixture
async def db_backend(db_backend_kind: str, db_place: Path | str) -> AsyncIterator[Backend]:
    backend = make_backend(db_backend_kind, db_place)
    await backend.interp.start()
    try:
        yield backend
    finally:
        await backend.interp.aclose()


@pytest.fixture
def db(db_backend: Backend) -> Interp:
    return db_backend.interp


def make_job(effect: Effect) -> JobContext:
    state = JobState(
        index=0, kind="effect", name=effect.span_name, queue="effects", step_index=0, effect=effect
    )
    return JobContext(state, MonotonicClock())


async def run(interp: Interp, effect: Effect) -> tuple[Any, JobContext]:
    job = make_job(effect)
    return await interp.perform(effect, job), job


async def perform_job(interp: Interp, job: JobContext) -> None:
    assert job.state.effect is not None
    await interp.perform(job.state.effect, job)


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition()`` holds; bounded: 10 s.

    (Not ``wait_all_tasks_blocked``: psycopg's waits wake every 100 ms to check
    their socket, so its tasks are seldom all blocked at once.)"""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


def rows_noted(job: JobContext) -> Any:
    """What the interpreter noted of the rows (PostgreSQL also notes the statement)."""
    assert job.state.result_meta is not None
    return job.state.result_meta["db.rows"]


async def test_put_get_del_roundtrip(db: Interp) -> None:
    value = {"title": "Hello", "tags": ["a", "b"], "n": 3, "ok": True, "none": None, "é": "ü"}
    result, job = await run(db, DbPut(table="blog_post", key="p1", value=value))
    assert result is None
    assert rows_noted(job) == 1

    got, job = await run(db, DbGet(table="blog_post", key="p1"))
    assert got == value
    assert list(got) == list(value)  # stored as the same JSON text: key order kept
    assert rows_noted(job) == 1

    await run(db, DbPut(table="blog_post", key="p1", value="replaced"))
    got, _ = await run(db, DbGet(table="blog_post", key="p1"))
    assert got == "replaced"

    deleted, job = await run(db, DbDel(table="blog_post", key="p1"))
    assert deleted is True
    assert rows_noted(job) == 1
    deleted, job = await run(db, DbDel(table="blog_post", key="p1"))
    assert deleted is False
    assert rows_noted(job) == 0


async def test_absent_key_is_none(db: Interp) -> None:
    got, job = await run(db, DbGet(table="never_written", key="nope"))
    assert got is None
    assert rows_noted(job) == 0
    assert job.state.outcome is None


async def test_tables_are_namespaces(db: Interp) -> None:
    await run(db, DbPut(table="a", key="k", value=1))
    await run(db, DbPut(table="b", key="k", value=2))
    assert (await run(db, DbGet(table="a", key="k")))[0] == 1
    assert (await run(db, DbGet(table="b", key="k")))[0] == 2


async def test_keys_are_exact_strings(db: Interp) -> None:
    keys = ["k", "K", "k ", "", "ü", "a'b", 'a"b', "x; DROP TABLE t; --"]
    for i, key in enumerate(keys):
        await run(db, DbPut(table="t", key=key, value=i))
    for i, key in enumerate(keys):
        assert (await run(db, DbGet(table="t", key=key)))[0] == i


async def test_every_query_records_io_wait(db_backend: Backend) -> None:
    _, job = await run(db_backend.interp, DbGet(table="t", key="k"))
    [episode] = job.state.park_episodes
    assert episode.cause == "io_wait"
    assert episode.token == db_backend.token
    assert episode.resume_ts is not None
    assert episode.resume_ts >= episode.park_ts


async def test_query_where_order_limit(db: Interp) -> None:
    posts = {
        "p1": {"author": "ann", "score": 5, "draft": False, "meta": {"lang": "en"}},
        "p2": {"author": "bob", "score": 9, "draft": False, "meta": {"lang": "de"}},
        "p3": {"author": "ann", "score": 7, "draft": True, "meta": {"lang": "en"}},
        "p4": {"author": "ann", "score": 1, "draft": False, "meta": {"lang": "de"}},
        "p5": {"author": "cat", "score": 3, "draft": False, "meta": None},
    }
    assert await db.put_many("post", posts) == 5

    rows, job = await run(db, DbQuery(table="post", where={"author": "ann"}, order_by="-score"))
    assert [r["score"] for r in rows] == [7, 5, 1]
    assert rows_noted(job) == 3
    assert job.state.park_episodes[0].cause == "io_wait"

    rows, _ = await run(db, DbQuery(table="post", order_by="score", limit=2))
    assert rows == [posts["p4"], posts["p5"]]

    rows, _ = await run(db, DbQuery(table="post", where={"author": "ann", "draft": False}))
    assert rows == [posts["p1"], posts["p4"]]  # unordered results follow the key

    rows, _ = await run(db, DbQuery(table="post", where={"meta.lang": "de"}, order_by="-score"))
    assert rows == [posts["p2"], posts["p4"]]

    rows, _ = await run(db, DbQuery(table="post", where={"meta": None}))
    assert rows == [posts["p5"]]

    rows, _ = await run(db, DbQuery(table="post", where={"author": "nobody"}))
    assert rows == []

    rows, _ = await run(db, DbQuery(table="post", limit=0))
    assert rows == []


async def test_mixed_types_match_and_order_alike(db: Interp) -> None:
    # What SQLite's json_extract makes of mixed JSON types is the reference:
    # null or missing < numbers (true is 1) < text in byte order; ties by key.
    values = {
        "a": {"s": 10},
        "b": {"s": "b"},
        "c": {"s": None},
        "d": {},
        "e": {"s": True},
        "f": {"s": 1.5},
        "g": {"s": "B"},
        "h": {"s": 2},
        "i": {"s": 1},
        "j": {"s": "10"},
    }
    await db.put_many("m", values)
    rows, _ = await run(db, DbQuery(table="m", order_by="s"))
    assert [r.get("s", "-") for r in rows] == [None, "-", True, 1, 1.5, 2, 10, "10", "B", "b"]
    rows, _ = await run(db, DbQuery(table="m", order_by="-s", limit=4))
    assert [r.get("s") for r in rows] == ["b", "B", "10", 10]
    rows, _ = await run(db, DbQuery(table="m", where={"s": None}))
    assert rows == [values["c"], values["d"]]
    rows, _ = await run(db, DbQuery(table="m", where={"s": True}))
    assert rows == [values["e"], values["i"]]
    rows, _ = await run(db, DbQuery(table="m", where={"s": 10}))
    assert rows == [values["a"]]
    rows, _ = await run(db, DbQuery(table="m", where={"s": "10"}))
    assert rows == [values["j"]]
    rows, _ = await run(db, DbQuery(table="m", where={"s": 1.5}))
    assert rows == [values["f"]]


async def test_keys_order_bytewise(db: Interp) -> None:
    await db.put_many("k", {"b": 1, "B": 2, "a": 3, "ä": 4, "_": 5, "10": 6, "9": 7})
    rows, _ = await run(db, DbQuery(table="k"))
    assert rows == [6, 7, 2, 5, 3, 1, 4]  # "10" < "9" < "B" < "_" < "a" < "b" < "ä"


@pytest.mark.parametrize(
    "table",
    ["", "bad name", 'x"; DROP TABLE post; --', "1abc", "sqlite_master", "ta-ble", "é", "a" * 129],
)
async def test_invalid_table_rejected(db: Interp, table: str) -> None:
    job = make_job(DbGet(table=table, key="k"))
    with pytest.raises(EffectError) as info:
        await db.perform(DbGet(table=table, key="k"), job)
    assert info.value.kind == "invalid_table"
    assert info.value.status_hint == 500
    assert info.value.retryable is False
    assert repr(table) in str(info.value)
    # Rejected before it could wait for a connection or touch the database.
    assert job.state.park_episodes == []


@pytest.mark.parametrize(
    "effect",
    [
        DbQuery(table="t", where={"a b": 1}),
        DbQuery(table="t", where={"x') OR 1=1 --": 1}),
        DbQuery(table="t", where={"": 1}),
        DbQuery(table="t", order_by="-score; DROP TABLE t"),
        DbQuery(table="t", order_by="a..b"),
        DbQuery(table="t", order_by="-"),
        DbQuery(table="t", where={"tags": ["a"]}),
        DbQuery(table="t", where={"tags": {"a": 1}}),
        DbQuery(table="t", limit=-1),
        DbQuery(table="t", limit=True),
    ],
)
async def test_invalid_query_rejected(db: Interp, effect: DbQuery) -> None:
    job = make_job(effect)
    with pytest.raises(EffectError) as info:
        await db.perform(effect, job)
    assert info.value.kind == "invalid_query"
    assert info.value.status_hint == 500
    assert job.state.park_episodes == []


async def test_unserialisable_value_rejected(db: Interp) -> None:
    with pytest.raises(EffectError) as info:
        await run(db, DbPut(table="t", key="k", value=object()))
    assert info.value.kind == "invalid_value"
    assert "'k'" in str(info.value)


async def test_unsupported_effect(db: Interp) -> None:
    with pytest.raises(EffectError) as info:
        await run(db, CacheGet(namespace="n", key="k"))
    assert info.value.kind == "unsupported_effect"


async def test_pool_shared_by_concurrent_jobs(db_backend_kind: str, db_place: Path | str) -> None:
    interp = make_backend(db_backend_kind, db_place, pool_size=3).interp
    seen: dict[int, object] = {}

    async def put_then_get(i: int) -> None:
        await run(interp, DbPut(table="t", key=f"k{i:02}", value=i))
        seen[i] = (await run(interp, DbGet(table="t", key=f"k{i:02}")))[0]

    try:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(put_then_get, i)
        rows, _ = await run(interp, DbQuery(table="t"))
    finally:
        await interp.aclose()
    assert rows == list(range(12))
    assert seen == {i: i for i in range(12)}
    assert interp.limiter.in_use == 0


async def test_pool_backpressure(db_backend: Backend) -> None:
    interp, lock = db_backend.interp, db_backend.lock
    if lock is None:
        pytest.skip("nothing outside the process can lock a private in-memory database")
    await run(interp, DbPut(table="t", key="seed", value=-1))
    jobs = [make_job(DbPut(table="t", key=f"k{i}", value=i)) for i in range(4)]
    # Another connection holds the write lock, so the first two jobs wait inside
    # the database while holding both pooled connections.
    with contextlib.ExitStack() as held:
        held.enter_context(lock("t"))
        async with anyio.create_task_group() as tg:
            for job in jobs[:2]:
                tg.start_soon(perform_job, interp, job)
            await until(lambda: interp.limiter.in_use == 2)
            for job in jobs[2:]:
                tg.start_soon(perform_job, interp, job)
            await until(lambda: interp.limiter.waiting == 2)
            held.close()  # the lock goes: every job finishes
    rows, _ = await run(interp, DbQuery(table="t"))

    assert rows == [0, 1, 2, 3, -1]
    assert interp.limiter.in_use == 0
    for job in jobs[:2]:
        assert [e.cause for e in job.state.park_episodes] == ["io_wait"]
    for job in jobs[2:]:
        backpressure, io_wait = job.state.park_episodes
        assert backpressure.cause == "backpressure"
        assert backpressure.token == "db_pool"
        assert backpressure.limit_current == backpressure.limit_max == 2
        assert backpressure.resume_ts is not None
        assert backpressure.resume_ts >= backpressure.park_ts
        assert io_wait.cause == "io_wait"
        assert io_wait.token == db_backend.token
        assert io_wait.park_ts >= backpressure.resume_ts


async def test_closed_interpreter_opens_again(db_backend: Backend) -> None:
    interp = db_backend.interp
    await run(interp, DbPut(table="t", key="k", value=[1, 2]))
    await interp.aclose()
    if db_backend.name == "sqlite_memory":
        await interp.start()  # a private in-memory database is gone with its pool
        assert (await run(interp, DbGet(table="t", key="k")))[0] is None
        return
    assert (await run(interp, DbGet(table="t", key="k")))[0] == [1, 2]
