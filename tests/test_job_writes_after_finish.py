"""Nothing writes to a job's record after the job finished.

Jobs cancelled when their join resolves keep unwinding for a while (their park
points exit, their interpreter's ``finally`` runs). A ticking clock (every reading
one microsecond later than the last) makes any late stamp visible: it would be
later than the job's end.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from zerver import (
    App,
    ConcurrencyLimiter,
    Context,
    DbGet,
    Done,
    JobContext,
    Join,
    Need,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver.testing import AppClient, InMemorySpanSink, RecordCapture

pytestmark = pytest.mark.anyio

A: Slot[Any] = Slot("a")
B: Slot[Any] = Slot("b")
C: Slot[Any] = Slot("c")


class TickingClock:
    """Every reading is 1 µs after the previous one; sleeping only yields."""

    def __init__(self) -> None:
        self._now = 0

    def now_ns(self) -> int:
        self._now += 1_000
        return self._now

    def wall_ns(self) -> int:
        return 1_700_000_000_000_000_000 + self._now

    async def sleep(self, seconds: float) -> None:
        await anyio.lowlevel.checkpoint()


class Db:
    """``fast`` answers at once; ``slow`` parks on I/O that never comes and, cancelled,
    tries to report and park again as it unwinds; ``held`` waits for a busy limiter."""

    def __init__(self) -> None:
        self.limiter = ConcurrencyLimiter("pool", 1)
        self.never = anyio.Event()
        self.unwound = 0

    async def start(self) -> None:
        await self.limiter.acquire()  # the pool's only slot is taken for good

    async def aclose(self) -> None:
        self.never.set()

    async def perform(self, effect: Any, job: JobContext) -> Any:
        if effect.table == "fast":
            return {"ok": True}
        try:
            if effect.table == "held":
                async with self.limiter.slot(job):
                    return None
            with job.parked("io_wait", "slow"):
                await self.never.wait()
            return None
        finally:
            self.unwound += 1
            job.note("late.note", True)
            with job.parked("other", "late"):
                pass


def _app() -> tuple[App, Db, RecordCapture, InMemorySpanSink]:
    app = App("late", settings=load_settings({}), clock=TickingClock())
    db = Db()
    app.interpreter("db", db)

    @step(writes=[A, B, C])
    def fan_out(ctx: Context) -> Need:
        return Need(
            [
                DbGet(table="slow", key="1", slot=A),
                DbGet(table="held", key="1", slot=B),
                DbGet(table="fast", key="1", slot=C),
            ],
            join=Join.ANY,
        )

    @step
    def answer(ctx: Context) -> Done:
        return Done(Response.json({}))

    app.get("/race", fan_out, answer)
    records = RecordCapture()
    app.subscribe(records)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    return app, db, records, sink


async def test_cancelled_jobs_write_nothing_after_they_finished() -> None:
    app, db, records, _ = _app()
    async with AppClient(app) as client:
        for _ in range(5):
            assert (await client.get("/race")).status == 200
        # Let the cancelled workers unwind (bounded: a few scheduling rounds).
        for _ in range(50):
            if db.unwound == 10:
                break
            await anyio.lowlevel.checkpoint()
    assert db.unwound == 10, "both cancelled jobs of every request unwound"
    assert len(records.records) == 5
    for rec in records.records:
        assert rec.end_ts is not None
        cancelled = [j for j in rec.jobs if j.outcome == "cancel"]
        assert len(cancelled) == 2
        for job in rec.jobs:
            assert job.end_ts is not None and job.end_ts <= rec.end_ts
            assert job.result_meta is None or "late.note" not in job.result_meta
            for ep in job.park_episodes:
                assert ep.token != "late", "no park recorded after the job ended"
                assert ep.resume_ts is not None and ep.park_ts <= ep.resume_ts <= job.end_ts


async def test_spans_of_cancelled_jobs_end_within_their_step() -> None:
    app, _, _, sink = _app()
    async with AppClient(app) as client:
        assert (await client.get("/race")).status == 200
    by_id = {s.span_id: s for s in sink.spans}
    effects = [s for s in sink.spans if s.name.startswith("db.get")]
    assert len(effects) == 3
    for span in effects:
        parent = by_id[span.parent_span_id]
        assert parent.name == "step.fan_out"
        assert parent.start_ns <= span.start_ns and span.end_ns <= parent.end_ns
        times = {name: t for name, t, _, _ in span.events}
        end_event = times.get("zerver.job.completed", times.get("zerver.job.failed"))
        assert end_event is not None
        for name, t, _, _ in span.events:
            assert t <= end_event <= span.end_ns, name
    root = next(s for s in sink.spans if s.parent_span_id == 0)
    for span in sink.spans:
        assert root.start_ns <= span.start_ns and span.end_ns <= root.end_ns, span.name


def test_a_long_never_taken_wait_is_queue_wait_and_is_promoted() -> None:
    """One rule (docs/jobs.md): a job cancelled while queued waited on the queue
    until it ended, and that wait is promoted like any other."""
    from zerver import VirtualClock
    from zerver.trace import RequestRecord, TraceEngine, durations
    from zerver.trace._records import JobState, StepRecord

    clock = VirtualClock()
    rec = RequestRecord(clock)
    rec.method, rec.route, rec.path = "GET", "/q", "/q"
    rec.start_trace()
    sr = StepRecord(index=0, name="ask", layer="route", sequence=1, reads=(), writes=(), start_ts=0)
    sr.span_id, sr.end_ts, sr.decision = rec.new_span_id(), 0, "Need"
    rec.steps.append(sr)
    job = JobState(
        index=0,
        kind="effect",
        name="db.get t",
        queue="effects",
        step_index=0,
        effect=DbGet(table="t", key="k"),
    )
    job.span_id = rec.new_span_id()
    job.enqueue_ts, job.end_ts, job.outcome = 0, 30_000_000, "cancel"
    job.error_type = "cancelled"
    rec.jobs.append(job)
    clock.advance_ms(30)
    rec.finish(504, 0)
    d = durations(job)
    assert (d.queue_wait_ms, d.dispatch_ms, d.park_wait_ms_total, d.run_active_ms) == (
        30.0,
        0.0,
        0.0,
        0.0,
    )
    sink = InMemorySpanSink()
    spans = TraceEngine(sink).build(rec)
    effect = next(s for s in spans if s.name == "db.get t")
    assert effect.attributes["job.queue_wait_ms"] == 30.0
    (wait,) = [s for s in spans if s.name == "job.queue_wait"]
    assert wait.parent_span_id == effect.span_id
    assert wait.end_ns - wait.start_ns == 30_000_000
    assert wait.attributes["job.queue_wait_ms"] == 30.0
