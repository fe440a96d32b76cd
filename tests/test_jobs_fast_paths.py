"""The job system's fast paths skip task switches, never waits, and record them exactly."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from support import NothingToOpen

from zerver import (
    App,
    CacheGet,
    Context,
    Done,
    Effect,
    Need,
    Response,
    Slot,
    VirtualClock,
    load_settings,
    step,
)
from zerver.runtime._jobs import Job, JobQueue
from zerver.testing import AppClient, FakeInterpreter, FakeRule, RecordCapture
from zerver.trace._records import COMPLETE, JobState, RequestRecord

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


async def test_take_now_never_overtakes_a_job_no_worker_was_woken_for() -> None:
    clock = VirtualClock()
    queue = JobQueue("q", capacity=4, workers=2, clock=clock)
    ran: list[str] = []
    async with anyio.create_task_group() as tg:
        queue.start(tg)
        while queue.idle_workers() < 2:
            await anyio.lowlevel.checkpoint()
        queue.enqueue(a_job(clock, ran, "woken for"))  # one worker is woken for it
        held = queue.take_now(a_job(clock, ran, "beside it"))  # the other idles: fine
        assert held is not None
        queue.enqueue(a_job(clock, ran, "waits"))  # no worker left to wake
        assert queue.take_now(a_job(clock, ran, "would overtake")) is None
        queue.give_back(held)  # the held worker goes on with the waiting job
        while len(ran) < 2:
            await anyio.lowlevel.checkpoint()
        assert ran == ["woken for", "waits"]
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


class Peek(Effect):
    system = "peek"
    operation = "get"


class _Peek(NothingToOpen):
    """Remembers which OpenTelemetry span is current while it performs."""

    system = "peek"

    def __init__(self, otel_spans: bool) -> None:
        self.otel_spans = otel_spans
        self.seen: list[int] = []

    async def perform(self, effect: Any, job: Any) -> Any:
        from opentelemetry import trace

        self.seen.append(trace.get_current_span().get_span_context().span_id)
        return "v"


@pytest.mark.parametrize("otel_spans", [True, False])
async def test_an_interpreter_that_makes_no_otel_spans_is_spared_the_context(
    otel_spans: bool,
) -> None:
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


class _SaysSynchronous(NothingToOpen):
    """Declares ``synchronous`` but waits (a misdeclared interpreter): the wait still
    runs under the effect's timeout."""

    system = "peek"
    synchronous = True

    def __init__(self, wait: bool) -> None:
        self.wait = wait

    async def perform(self, effect: Any, job: Any) -> Any:
        if self.wait:
            await anyio.Event().wait()  # never set: only the timeout ends it
        return "answered"


@pytest.mark.parametrize("wait", [False, True], ids=["answers-at-once", "waits-anyway"])
async def test_a_synchronous_interpreter_runs_without_a_scope_and_still_times_out(
    wait: bool,
) -> None:
    from zerver import RetryPolicy

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


B: Slot[Any] = Slot("b")


@step(reads=[A, B])
def render_both(ctx: Context) -> Done:
    return Done(Response.json({"a": ctx.optional(A), "b": ctx.optional(B)}))


@step(writes=[A, B])
def load_both(ctx: Context) -> Need:
    return Need(
        [
            CacheGet(namespace="n", key="slow", slot=A, required=False),
            CacheGet(namespace="n", key="k", slot=B, required=False, name="in-process"),
        ],
        then=render_both,
    )


async def test_a_synchronous_effect_runs_on_the_request_task_with_its_lifecycle_recorded() -> None:
    clock = VirtualClock()
    app = App("held", settings=load_settings({}), clock=clock)
    app.get("/x", load_both)
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as client:
        for _ in range(3):
            assert (await client.get("/x")).status == 200
        effects = app.jobs.effects
        assert effects.idle_workers() == effects.workers  # every held worker was given back
    for record in cap.records:
        jobs = [j for j in record.jobs if j.kind == "effect"]
        assert [j.outcome for j in jobs] == [COMPLETE, COMPLETE]
        for j in jobs:
            assert j.enqueue_ts == j.take_ts is not None  # idle workers: taken at once
            assert j.start_ts is not None and j.end_ts is not None and j.end_ts >= j.start_ts


class Wait(Effect):
    system = "waiter"
    operation = "get"


class _Gate:
    """One event shared by two interpreters: "waiter" (says it is synchronous, but
    waits for the gate) and "opener" (an ordinary one, opens it)."""

    def __init__(self) -> None:
        self.event = anyio.Event()


class _Waiter(NothingToOpen):
    system = "waiter"
    synchronous = True

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate

    async def perform(self, effect: Any, job: Any) -> Any:
        await self.gate.event.wait()
        return "waited"


class _Opener(_Waiter):
    system = "opener"
    synchronous = False

    async def perform(self, effect: Any, job: Any) -> Any:
        self.gate.event.set()
        return "opened"


class Open(Effect):
    system = "opener"
    operation = "get"


@step(writes=[A, B])
def wait_and_open(ctx: Context) -> Need:
    """A synchronous interpreter that waits after all, then one that waits."""
    return Need([Wait(slot=A, timeout_ms=5000), Open(slot=B)], then=render_both)


async def test_a_held_effect_that_waits_lets_the_others_run_and_joins_with_them() -> None:
    """The held effect runs on the request's task; when it waits after all, the
    task yields, the other effect runs on its worker meanwhile, and the join sees
    both (no deadlock, the wait under the effect's timeout)."""

    gate = _Gate()
    app = App("held-waits", settings=load_settings({}))
    app.interpreter("waiter", _Waiter(gate))
    app.interpreter("opener", _Opener(gate))
    app.get("/x", wait_and_open)
    async with AppClient(app) as client:
        with anyio.fail_after(10):
            response = await client.get("/x")
        effects = app.jobs.effects
        assert effects.idle_workers() == effects.workers
    assert response.status == 200
    assert json.loads(response.body) == {"a": "waited", "b": "opened"}


async def test_cancelling_an_attempt_under_the_native_timeout_stops_it_at_once() -> None:
    """A join resolved by a failed required effect cancels a running attempt: on
    asyncio that fires its timeout now, and the job ends cancelled, not timed out."""

    class Fails(Effect):
        system = "opener"
        operation = "get"

    class _Failing(_Opener):
        async def perform(self, effect: Any, job: Any) -> Any:
            from zerver import EffectError

            raise EffectError("no", kind="broken", status_hint=503)

    @step(writes=[A, B])
    def both(ctx: Context) -> Need:
        return Need([Wait(slot=A, timeout_ms=60_000), Fails(slot=B)], then=render_both)

    gate = _Gate()
    waiter = _Waiter(gate)
    waiter.synchronous = False  # on a worker, under the timeout
    app = App("cancel", settings=load_settings({}))
    app.interpreter("waiter", waiter)
    app.interpreter("opener", _Failing(gate))
    app.get("/x", both)
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as client:
        with anyio.fail_after(10):
            response = await client.get("/x")
        # The waiting attempt was stopped, not left waiting for its minute.
        effects = app.jobs.effects
        for _ in range(100):
            if effects.idle_workers() == effects.workers:
                break
            await anyio.lowlevel.checkpoint()
        assert effects.idle_workers() == effects.workers
    assert response.status == 503
    wait_job, fail_job = [j for j in cap.records[0].jobs if j.kind == "effect"]
    assert wait_job.outcome != COMPLETE and wait_job.error_type == "cancelled"
    assert fail_job.error_type == "broken"


class Ping(Effect):
    system = "ping"
    operation = "get"


class Pong(Effect):
    system = "pong"
    operation = "get"


class _Rally:
    """Two interpreters that can only finish side by side: "pong" serves and waits
    for the return, "ping" waits for the serve and returns it. Each notes the task
    it ran on."""

    def __init__(self) -> None:
        self.served = anyio.Event()
        self.returned = anyio.Event()
        self.tasks: dict[str, str] = {}

    def interpreters(self) -> tuple[Any, Any]:
        rally = self

        class _Ping(NothingToOpen):
            system = "ping"

            async def perform(self, effect: Any, job: Any) -> Any:
                rally.tasks["ping"] = str(anyio.get_current_task().name)
                await rally.served.wait()
                rally.returned.set()
                return "ping"

        class _Pong(NothingToOpen):
            system = "pong"

            async def perform(self, effect: Any, job: Any) -> Any:
                rally.tasks["pong"] = str(anyio.get_current_task().name)
                rally.served.set()
                await rally.returned.wait()
                return "pong"

        return _Ping(), _Pong()


async def test_the_last_effect_that_waits_runs_on_the_request_task_beside_the_others() -> None:
    """In a parallel Need, the last effect whose interpreter waits is run by the
    request's task for an idle worker, after the others have started on theirs: the
    two still run side by side (each needs the other to finish), and both are
    recorded as taken when they were."""

    @step(writes=[A, B])
    def rally_step(ctx: Context) -> Need:
        return Need(
            [Ping(slot=A, timeout_ms=5000), Pong(slot=B, timeout_ms=5000)], then=render_both
        )

    rally = _Rally()
    app = App("rally", settings=load_settings({}))
    ping, pong = rally.interpreters()
    app.interpreter("ping", ping)
    app.interpreter("pong", pong)
    app.get("/x", rally_step)
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as client:
        with anyio.fail_after(10):
            response = await client.get("/x")
        effects = app.jobs.effects
        assert effects.idle_workers() == effects.workers  # the held worker was given back
    assert response.status == 200
    assert json.loads(response.body) == {"a": "ping", "b": "pong"}
    assert rally.tasks["ping"].startswith("zerver-effects-")
    assert not rally.tasks["pong"].startswith("zerver-effects-")
    ping_job, pong_job = [j for j in cap.records[0].jobs if j.kind == "effect"]
    assert pong_job.enqueue_ts == pong_job.take_ts is not None  # taken at once
    assert ping_job.enqueue_ts is not None and ping_job.take_ts is not None
    assert ping_job.take_ts >= ping_job.enqueue_ts  # when its woken worker came to it
    for j in (ping_job, pong_job):
        assert j.outcome == COMPLETE
        assert j.take_ts is not None and j.start_ts is not None
        assert j.start_ts >= j.take_ts
    assert pong_job.worker != ping_job.worker


async def test_a_held_effect_that_waits_hands_the_waiting_one_to_its_worker() -> None:
    """A synchronous interpreter that waits after all, ahead of the effect held to
    wait: that effect goes to its worker at once (taken again, later, as recorded),
    so the two still meet."""

    gate = _Gate()
    ran_on: list[str] = []

    class _NotedOpener(_Opener):
        async def perform(self, effect: Any, job: Any) -> Any:
            ran_on.append(str(anyio.get_current_task().name))
            return await super().perform(effect, job)

    app = App("handed", settings=load_settings({}))
    app.interpreter("waiter", _Waiter(gate))
    app.interpreter("opener", _NotedOpener(gate))
    app.get("/x", wait_and_open)
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as client:
        with anyio.fail_after(10):
            response = await client.get("/x")
        effects = app.jobs.effects
        assert effects.idle_workers() == effects.workers
    assert response.status == 200
    assert ran_on and ran_on[0].startswith("zerver-effects-")
    wait_job, open_job = [j for j in cap.records[0].jobs if j.kind == "effect"]
    assert wait_job.enqueue_ts == wait_job.take_ts
    assert open_job.enqueue_ts is not None and open_job.take_ts is not None
    assert open_job.take_ts >= open_job.enqueue_ts
    assert open_job.start_ts is not None and open_job.start_ts >= open_job.take_ts
    assert (wait_job.outcome, open_job.outcome) == (COMPLETE, COMPLETE)
