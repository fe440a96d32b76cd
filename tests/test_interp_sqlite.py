"""SqliteInterpreter against real SQLite databases (files and shared in-memory)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from zerver._clock import MonotonicClock
from zerver._effects import CacheGet, DbDel, DbGet, DbPut, DbQuery, Effect
from zerver._errors import EffectError
from zerver._interpreters import SqliteInterpreter
from zerver._park import JobContext
from zerver._records import JobState

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_job(effect: Effect) -> JobContext:
    state = JobState(
        index=0, kind="effect", name=effect.span_name, queue="effects", step_index=0, effect=effect
    )
    return JobContext(state, MonotonicClock())


async def run(interp: SqliteInterpreter, effect: Effect) -> tuple[Any, JobContext]:
    job = make_job(effect)
    return await interp.perform(effect, job), job


async def perform_job(interp: SqliteInterpreter, job: JobContext) -> None:
    assert job.state.effect is not None
    await interp.perform(job.state.effect, job)


@pytest.fixture(params=["file", "memory"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqliteInterpreter]:
    path = tmp_path / "app.sqlite3" if request.param == "file" else ":memory:"
    interp = SqliteInterpreter(path, pool_size=2)
    await interp.start()
    try:
        yield interp
    finally:
        await interp.aclose()


async def test_put_get_del_roundtrip(db: SqliteInterpreter) -> None:
    value = {"title": "Hello", "tags": ["a", "b"], "n": 3, "ok": True, "none": None}
    result, job = await run(db, DbPut(table="blog_post", key="p1", value=value))
    assert result is None
    assert job.state.result_meta == {"db.rows": 1}

    got, job = await run(db, DbGet(table="blog_post", key="p1"))
    assert got == value
    assert job.state.result_meta == {"db.rows": 1}

    await run(db, DbPut(table="blog_post", key="p1", value="replaced"))
    got, _ = await run(db, DbGet(table="blog_post", key="p1"))
    assert got == "replaced"

    deleted, job = await run(db, DbDel(table="blog_post", key="p1"))
    assert deleted is True
    assert job.state.result_meta == {"db.rows": 1}
    deleted, _ = await run(db, DbDel(table="blog_post", key="p1"))
    assert deleted is False


async def test_absent_key_is_none(db: SqliteInterpreter) -> None:
    got, job = await run(db, DbGet(table="never_written", key="nope"))
    assert got is None
    assert job.state.result_meta == {"db.rows": 0}
    assert job.state.outcome is None


async def test_tables_are_namespaces(db: SqliteInterpreter) -> None:
    await run(db, DbPut(table="a", key="k", value=1))
    await run(db, DbPut(table="b", key="k", value=2))
    assert (await run(db, DbGet(table="a", key="k")))[0] == 1
    assert (await run(db, DbGet(table="b", key="k")))[0] == 2


async def test_every_query_records_io_wait(db: SqliteInterpreter) -> None:
    _, job = await run(db, DbGet(table="t", key="k"))
    [episode] = job.state.park_episodes
    assert episode.cause == "io_wait"
    assert episode.token == "sqlite"
    assert episode.resume_ts is not None
    assert episode.resume_ts >= episode.park_ts


async def test_query_where_order_limit(db: SqliteInterpreter) -> None:
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
    assert job.state.result_meta == {"db.rows": 3}
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


@pytest.mark.parametrize(
    "table",
    ["", "bad name", 'x"; DROP TABLE post; --', "1abc", "sqlite_master", "ta-ble", "é", "a" * 129],
)
async def test_invalid_table_rejected(db: SqliteInterpreter, table: str) -> None:
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
        DbQuery(table="t", limit=-1),
    ],
)
async def test_invalid_query_rejected(db: SqliteInterpreter, effect: DbQuery) -> None:
    with pytest.raises(EffectError) as info:
        await run(db, effect)
    assert info.value.kind == "invalid_query"
    assert info.value.status_hint == 500


async def test_unserialisable_value_rejected(db: SqliteInterpreter) -> None:
    with pytest.raises(EffectError) as info:
        await run(db, DbPut(table="t", key="k", value=object()))
    assert info.value.kind == "invalid_value"
    assert "'k'" in str(info.value)


async def test_unsupported_effect(db: SqliteInterpreter) -> None:
    with pytest.raises(EffectError) as info:
        await run(db, CacheGet(namespace="n", key="k"))
    assert info.value.kind == "unsupported_effect"


async def test_lazy_start_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "lazy.sqlite3"
    interp = SqliteInterpreter(path)
    try:
        await run(interp, DbPut(table="t", key="k", value=[1, 2]))
    finally:
        await interp.aclose()
    # WAL mode is a property of the file.
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    try:
        await interp.start()
        assert (await run(interp, DbGet(table="t", key="k")))[0] == [1, 2]
    finally:
        await interp.aclose()


async def test_memory_databases_are_private() -> None:
    one, two = SqliteInterpreter(":memory:"), SqliteInterpreter(":memory:")
    try:
        await run(one, DbPut(table="t", key="k", value="one"))
        assert (await run(two, DbGet(table="t", key="k")))[0] is None
    finally:
        await one.aclose()
        await two.aclose()


async def test_memory_database_shared_by_pool() -> None:
    interp = SqliteInterpreter(":memory:", pool_size=3)
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


async def test_pool_backpressure(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite3"
    interp = SqliteInterpreter(path, pool_size=2)
    await interp.start()
    await run(interp, DbPut(table="t", key="seed", value=-1))
    # Another writer holds the write lock, so the first two jobs wait inside
    # SQLite (busy_timeout) while holding both pooled connections.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    jobs = [make_job(DbPut(table="t", key=f"k{i}", value=i)) for i in range(4)]
    try:
        async with anyio.create_task_group() as tg:
            for job in jobs[:2]:
                tg.start_soon(perform_job, interp, job)
            await wait_all_tasks_blocked()
            assert interp.limiter.in_use == 2
            for job in jobs[2:]:
                tg.start_soon(perform_job, interp, job)
            await wait_all_tasks_blocked()
            assert interp.limiter.waiting == 2
            blocker.execute("COMMIT")
        rows, _ = await run(interp, DbQuery(table="t"))
    finally:
        blocker.close()
        await interp.aclose()

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
        assert io_wait.token == "sqlite"
        assert io_wait.park_ts >= backpressure.resume_ts


async def test_locked_database_is_retryable(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    interp = SqliteInterpreter(path, busy_timeout_ms=20)
    await run(interp, DbPut(table="t", key="k", value=1))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(EffectError) as info:
            await run(interp, DbPut(table="t", key="k", value=2))
        # Readers are not blocked by a writer in WAL mode.
        assert (await run(interp, DbGet(table="t", key="k")))[0] == 1
    finally:
        blocker.close()
        await interp.aclose()
    assert info.value.kind == "db_error"
    assert info.value.status_hint == 500
    assert info.value.retryable is True
    assert "locked" in str(info.value)


async def test_other_db_errors_are_not_retryable(tmp_path: Path) -> None:
    path = tmp_path / "schema.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE "legacy" (x INTEGER)')
    conn.close()
    interp = SqliteInterpreter(path)
    try:
        with pytest.raises(EffectError) as info:
            await run(interp, DbPut(table="legacy", key="k", value=1))
    finally:
        await interp.aclose()
    assert info.value.kind == "db_error"
    assert info.value.retryable is False
    assert "legacy" in str(info.value)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        SqliteInterpreter(":memory:", pool_size=0)
    with pytest.raises(ValueError, match="busy_timeout_ms"):
        SqliteInterpreter(":memory:", busy_timeout_ms=-1)
