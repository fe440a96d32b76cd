"""What only SqliteInterpreter does: WAL files, private in-memory databases, locks.

The effects themselves (results, park records, refusals) are tested once for
every database in test_interp_db.py.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from zerver.core._clock import MonotonicClock
from zerver.core._effects import DbGet, DbPut, Effect
from zerver.core._errors import EffectError
from zerver.runtime._park import JobContext
from zerver.runtime.interpreters import SqliteInterpreter
from zerver.trace._records import JobState

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


async def test_a_new_file_waits_for_another_writer_before_switching_to_wal(
    tmp_path: Path,
) -> None:
    """SQLite refuses the switch to WAL at once while another connection writes (its
    busy handler is not consulted): the interpreter keeps trying for busy_timeout_ms."""
    path = tmp_path / "new.sqlite3"
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute('CREATE TABLE "t" (key TEXT PRIMARY KEY, value TEXT NOT NULL)')
    blocker.execute("BEGIN IMMEDIATE")
    interp = SqliteInterpreter(path, busy_timeout_ms=200)
    started = time.monotonic()
    try:
        with pytest.raises(EffectError) as info:
            await interp.start()
        waited = time.monotonic() - started
    finally:
        blocker.close()
        await interp.aclose()
    assert waited >= 0.2  # the whole busy timeout, not an instant refusal
    assert info.value.retryable is True
    assert "locked" in str(info.value)


async def test_processes_opening_one_new_file_together_all_start(tmp_path: Path) -> None:
    """Several interpreters (as several worker processes would) open one fresh file
    and write to it at once: every one of them starts, and the file ends in WAL mode."""
    for attempt in range(40):  # bounded: each round is a fresh file and a fresh race
        path = tmp_path / f"shared-{attempt}.sqlite3"
        interps = [SqliteInterpreter(path, pool_size=2) for _ in range(4)]
        try:
            async with anyio.create_task_group() as tg:
                for n, interp in enumerate(interps):
                    tg.start_soon(run, interp, DbPut(table="t", key=str(n), value=n))
            stored = [(await run(interps[0], DbGet(table="t", key=str(n))))[0] for n in range(4)]
            assert stored == [0, 1, 2, 3]
        finally:
            for interp in interps:
                await interp.aclose()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


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
