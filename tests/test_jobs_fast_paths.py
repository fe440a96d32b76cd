"""The job system's fast paths skip task switches, never waits, and record them exactly."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from zerver import (
    App,
    CacheGet,
    Context,
    Done,
    Need,
    Response,
    Slot,
    VirtualClock,
    load_settings,
    step,
)
from zerver._jobs import Job, JobQueue
from zerver._records import COMPLETE, JobState, RequestRecord
from zerver.testing import AppClient, FakeInterpreter, FakeRule, RecordCapture

pytestmark = pytest.mark.anyio

A: Slot[Any] = Slot("a")


def a_job(clock: VirtualClock, ran: list[str], name: str) -> Job:
    async def work(job: Job) -> None:
        ran.append(name)
        job.finish(COMPLETE)

    state = JobState(index=0, kind="continuation", name=name, queue="q", step_index=0)
    return Job(state, clock, work, lambda job: None, RequestRecord(clock))


async def test_take_now_takes_for_an_idle_worker_and_gives_it_back() -> None:
    clock = VirtualClock(start_ns=1_000)
    queue = JobQueue("q", capacity=4, workers=2, clock=clock)
    ran: list[str] = []
    async with anyio.create_task_group() as tg:
        queue.start(tg)
        while queue.idle_workers() < 2:
            await anyio.lowlevel.checkpoint()
        job = a_job(clock, ran, "inline")
        worker = queue.take_now(job)
        assert worker is not None
        st = job.state
        assert st.enqueue_ts == st.take_ts == 1_000
        assert (st.depth_enqueue, st.depth_take, st.worker) == (0, 0, 1)  # the last idle worker
        assert queue.idle_workers() == 1
        # While it is held, a queued job goes to the other worker; none is lost.
        queue.enqueue(a_job(clock, ran, "queued"))
        queue.give_back(worker)
        while "queued" not in ran or queue.idle_workers() < 2:
            await anyio.lowlevel.checkpoint()
        queue.close()
    assert ran == ["queued"]


async def test_take_now_refuses_when_jobs_wait_or_no_worker_idles() -> None:
    clock = VirtualClock()
    queue = JobQueue("q", capacity=4, workers=1, clock=clock)
    ran: list[str] = []
    assert queue.take_now(a_job(clock, ran, "no worker yet")) is None
    async with anyio.create_task_group() as tg:
        queue.start(tg)
        while queue.idle_workers() < 1:
            await anyio.lowlevel.checkpoint()
        held = queue.take_now(a_job(clock, ran, "first"))
        assert held is not None
        assert queue.take_now(a_job(clock, ran, "second")) is None  # the only worker is held
        queue.give_back(held)
        queue.close()


@step(reads=[A])
def render(ctx: Context) -> Done:
    return Done(Response.json({"a": ctx.optional(A)}))


@step(writes=[A])
def load(ctx: Context) -> Need:
    return Need(CacheGet(namespace="n", key="k", slot=A, required=False), then=render)


async def test_a_continuation_runs_on_the_request_task_with_its_lifecycle_recorded() -> None:
    clock = VirtualClock()
    app = App("inline", settings=load_settings({}), clock=clock)
    app.interpreter("cache", FakeInterpreter(clock, default=FakeRule(result="v")))
    app.get("/x", load)
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as client:
        for _ in range(3):
            assert (await client.get("/x")).status == 200
        conts = app.jobs.continuations
        assert conts.idle_workers() == conts.workers  # every held worker was given back
    for record in cap.records:
        [cont] = [j for j in record.jobs if j.kind == "continuation"]
        assert cont.outcome == COMPLETE
        assert cont.enqueue_ts == cont.take_ts is not None
        assert cont.start_ts is not None and cont.start_ts >= cont.take_ts
        assert cont.worker == conts.workers - 1  # the warm, last idle worker


class _Peek:
    """Remembers which OpenTelemetry span is current while it performs."""

    system = "peek"

    def __init__(self, otel_spans: bool) -> None:
        self.otel_spans = otel_spans
        self.seen: list[int] = []

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def perform(self, effect: Any, job: Any) -> Any:
        from opentelemetry import trace

        self.seen.append(trace.get_current_span().get_span_context().span_id)
        return "v"


@pytest.mark.parametrize("otel_spans", [True, False])
async def test_an_interpreter_that_makes_no_otel_spans_is_spared_the_context(
    otel_spans: bool,
) -> None:
    from zerver import Effect

    class Peek(Effect):
        system = "peek"
        operation = "get"

    @step(writes=[A])
    def peek(ctx: Context) -> Need:
        return Need(Peek(slot=A), then=render)

    interp = _Peek(otel_spans)
    app = App("peek", settings=load_settings({}))
    app.interpreter("peek", interp)
    app.get("/p", peek)
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as client:
        assert (await client.get("/p")).status == 200
    [effect_job] = [j for j in cap.records[0].jobs if j.kind == "effect"]
    assert interp.seen == [effect_job.span_id if otel_spans else 0]


class _SaysSynchronous:
    """Declares ``synchronous`` but waits (a misdeclared interpreter): the wait still
    runs under the effect's timeout."""

    system = "peek"
    synchronous = True

    def __init__(self, wait: bool) -> None:
        self.wait = wait

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def perform(self, effect: Any, job: Any) -> Any:
        if self.wait:
            await anyio.Event().wait()  # never set: only the timeout ends it
        return "answered"


@pytest.mark.parametrize("wait", [False, True], ids=["answers-at-once", "waits-anyway"])
async def test_a_synchronous_interpreter_runs_without_a_scope_and_still_times_out(
    wait: bool,
) -> None:
    from zerver import Effect, RetryPolicy

    class Peek(Effect):
        system = "peek"
        operation = "get"

    @step(writes=[A])
    def peek(ctx: Context) -> Need:
        return Need(Peek(slot=A, timeout_ms=50, retry=RetryPolicy(max_attempts=1)), then=render)

    app = App("sync", settings=load_settings({}))
    app.interpreter("peek", _SaysSynchronous(wait))
    app.get("/p", peek)
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as client:
        with anyio.fail_after(10):
            response = await client.get("/p")
    [job] = [j for j in cap.records[0].jobs if j.kind == "effect"]
    if wait:
        assert (response.status, job.error_type) == (504, "timeout")
    else:
        assert response.status == 200 and job.outcome == COMPLETE
