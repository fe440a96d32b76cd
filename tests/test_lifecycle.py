"""The job lifecycle as the job system records it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from support import app_with_fake_db

from zerver import (
    App,
    Context,
    DbGet,
    DbPut,
    Done,
    Join,
    Need,
    Request,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver.runtime.interpreters import SqliteInterpreter
from zerver.testing import AppClient, FakeInterpreter, RecordCapture
from zerver.trace import JobState

pytestmark = pytest.mark.anyio

A: Slot[Any] = Slot("a")
B: Slot[Any] = Slot("b")


def phases(j: JobState) -> tuple[int, int, int, int, int]:
    """queue wait, dispatch, park total, run active, total (ns)."""
    assert j.enqueue_ts is not None and j.end_ts is not None
    take = j.take_ts if j.take_ts is not None else j.enqueue_ts
    start = j.start_ts if j.start_ts is not None else take
    park = sum((p.resume_ts or j.end_ts) - p.park_ts for p in j.park_episodes)
    return (
        take - j.enqueue_ts,
        start - take,
        park,
        (j.end_ts - start) - park,
        j.end_ts - j.enqueue_ts,
    )


@step
def answer(ctx: Context) -> Done:
    return Done(Response.json({"a": ctx.optional(A), "b": ctx.optional(B)}))


async def test_db_effect_behind_full_pool_parks_with_backpressure(tmp_path: Path) -> None:
    app = App("pool", settings=load_settings({}))
    db = SqliteInterpreter(tmp_path / "pool.sqlite3", pool_size=1)
    app.interpreter("db", db)
    cap = RecordCapture()
    app.subscribe(cap)

    @step
    def seed(ctx: Context) -> Need:
        return Need(
            [DbPut(table="t", key="1", value={"v": 1}), DbPut(table="t", key="2", value={"v": 2})]
        )

    @step
    def load(ctx: Context) -> Need:
        return Need(
            [DbGet(table="t", key="1", slot=A), DbGet(table="t", key="2", slot=B)],
            join=Join.ALL,
            then=answer,
        )

    app.get("/pool", seed, load)
    async with AppClient(app) as c:
        r = await c.get("/pool")
    assert r.status == 200 and r.body == b'{"a":{"v":1},"b":{"v":2}}'
    rec = cap.last
    gets = [j for j in rec.jobs if j.name == "db.get t"]
    assert len(gets) == 2
    waited = [j for j in gets if any(p.cause == "backpressure" for p in j.park_episodes)]
    assert len(waited) == 1
    job = waited[0]
    bp = next(p for p in job.park_episodes if p.cause == "backpressure")
    assert bp.token == "db_pool"
    assert (bp.limit_current, bp.limit_max) == (1, 1)
    for j in gets:
        assert j.enqueue_ts is not None and j.take_ts is not None and j.start_ts is not None
        assert j.enqueue_ts <= j.take_ts <= j.start_ts <= (j.end_ts or 0)
        assert any(p.cause == "io_wait" for p in j.park_episodes)
        for p in j.park_episodes:
            assert p.resume_ts is not None and j.start_ts <= p.park_ts <= p.resume_ts <= (
                j.end_ts or 0
            )
        qw, disp, park, active, total = phases(j)
        assert min(qw, disp, park, active) >= 0
        assert qw + disp + park + active == total
        assert j.outcome == "complete" and j.attempts == 1 and j.worker is not None
    # The waiting job's back-pressure lasted while the other held the only connection.
    other = next(j for j in gets if j is not job)
    assert bp.park_ts >= (other.start_ts or 0)


async def test_queue_wait_and_depth_recorded_on_virtual_clock() -> None:
    app, _clock, fake = app_with_fake_db("q", load_settings({}, workers_effects=1))
    fake.on("db.get a", result=1, work_ms=7)
    fake.on("db.get b", result=2, work_ms=3)
    cap = RecordCapture()
    app.subscribe(cap)

    @step
    def load(ctx: Context) -> Need:
        return Need(
            [DbGet(table="a", key="k", slot=A), DbGet(table="b", key="k", slot=B)], then=answer
        )

    app.get("/q", load)
    async with AppClient(app) as c:
        await c.get("/q")
    a, b, cont = cap.last.jobs
    assert (a.depth_enqueue, b.depth_enqueue) == (0, 1)
    assert (a.depth_take, b.depth_take) == (1, 0)  # b was still queued when a was taken
    # With one worker, b waited in the queue while a worked for 7 ms.
    assert phases(a)[0] == 0
    assert phases(b)[0] == 7_000_000
    assert phases(b)[3] == 3_000_000
    assert cont.kind == "continuation" and cont.queue == "continuations"
    assert cont.enqueue_ts == b.end_ts  # the join resolved when b ended


async def test_full_queue_fails_fast_with_429() -> None:
    settings = load_settings({}, workers_effects=1, queue_capacity_effects=1)
    app, _clock, fake = app_with_fake_db("full", settings)
    gate = anyio.Event()
    fake.on("db.get t", result=1, gate=gate)
    cap = RecordCapture()
    app.subscribe(cap)

    @step
    def load(ctx: Context) -> Need:
        return Need([DbGet(table="t", key=str(i)) for i in range(3)], then=answer)

    app.get("/full", load)
    async with AppClient(app) as c:
        r = await c.get("/full")
        gate.set()
    assert r.status == 429 and r.header("retry-after") == "1"
    jobs = cap.last.jobs
    assert jobs[2].outcome == "fail" and jobs[2].error_type == "queue_full"
    assert jobs[2].take_ts is None  # refused at enqueue, never taken
    assert [j.outcome for j in jobs[:2]] == ["cancel", "cancel"]


async def test_effect_timeout_fails_the_job_with_504() -> None:
    app = App("timeout", settings=load_settings({}))
    fake = FakeInterpreter(app.clock)
    fake.on("db.get slow", result=1, gate=anyio.Event())  # never set
    app.interpreter("db", fake)
    cap = RecordCapture()
    app.subscribe(cap)

    @step
    def load(ctx: Context) -> Need:
        return Need(DbGet(table="slow", key="k", timeout_ms=20), then=answer)

    app.get("/slow", load)
    async with AppClient(app) as c:
        r = await c.get("/slow")
    assert r.status == 504
    job = cap.last.jobs[0]
    assert job.outcome == "fail" and job.error_type == "timeout"
    assert all(p.resume_ts is not None for p in job.park_episodes)


async def test_cancelled_request_cancels_its_jobs() -> None:
    app, _clock, fake = app_with_fake_db("cancel", load_settings({}, workers_effects=1))
    fake.on("db.get t", result=1, gate=anyio.Event())
    cap = RecordCapture()
    app.subscribe(cap)

    @step
    def load(ctx: Context) -> Need:
        return Need([DbGet(table="t", key="1"), DbGet(table="t", key="2")], then=answer)

    app.get("/c", load)
    async with app.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(app.dispatch, Request.from_target("GET", "/c"))
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()  # as the server does when the client disconnects
    rec = cap.last
    assert rec.status == 499
    running, queued = rec.jobs
    assert running.outcome == "cancel" and running.start_ts is not None
    assert queued.outcome == "cancel" and queued.take_ts is None
    assert all(p.resume_ts is not None for p in running.park_episodes)
