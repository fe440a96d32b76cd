"""The tracez aggregator: buckets at their edges, bounded samples, running and errors."""

from __future__ import annotations

import random
import types
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import app_with_fake_db

from zerver import (
    Context,
    DbGet,
    Done,
    EffectError,
    Need,
    Request,
    Response,
    Slot,
    VirtualClock,
    load_settings,
    step,
)
from zerver.trace._records import JobState, Outcome, RequestRecord
from zerver.zpages import (
    BUCKET_LABELS,
    BUCKET_LOWER_NS,
    TracezAggregator,
    latency_bucket,
    span_names,
)

V: Slot[Any] = Slot("v")

EDGES = [10**e for e in range(4, 12)]  # 10µs ... 100s


def finished(
    clock: VirtualClock, duration_ns: int, *, status: int = 200, route: str = "/r"
) -> RequestRecord:
    rec = RequestRecord(clock, random.Random(duration_ns))
    rec.method, rec.route = "GET", route
    rec.start_trace()
    clock.advance(duration_ns)
    rec.finish(status, 0)
    return rec


def test_nine_buckets_with_the_zpages_edges() -> None:
    assert tuple(BUCKET_LOWER_NS) == (0, *EDGES)
    assert len(BUCKET_LABELS) == 9
    assert BUCKET_LABELS[0] == "[0, 10µs)" and BUCKET_LABELS[-1] == "[100s, ∞)"


@pytest.mark.parametrize("index", range(8))
def test_a_duration_on_an_edge_opens_the_next_bucket(index: int) -> None:
    edge = EDGES[index]
    assert latency_bucket(edge - 1) == index
    assert latency_bucket(edge) == index + 1
    assert latency_bucket(edge + 1) == index + 1


@given(st.integers(min_value=0, max_value=10**15))
@settings(max_examples=200)
def test_every_duration_falls_inside_its_bucket(ns: int) -> None:
    b = latency_bucket(ns)
    assert BUCKET_LOWER_NS[b] <= ns
    assert b == 8 or ns < BUCKET_LOWER_NS[b + 1]


def test_records_on_each_edge_are_counted_in_the_bucket_the_edge_opens() -> None:
    clock = VirtualClock()
    agg = TracezAggregator()
    durations = [0, *[e - 1 for e in EDGES], *EDGES]
    for d in durations:
        agg.on_request_end(finished(clock, d))
    (row,) = agg.summary()
    assert row.name == "http.server: GET /r"
    # 0 and 10µs-1 in the first; each edge and the next edge minus one in the next.
    assert row.latency == (2, 2, 2, 2, 2, 2, 2, 2, 1)
    assert row.errors == 0 and row.running == 0


def test_samples_per_bucket_are_bounded_newest_first_and_evictions_counted() -> None:
    clock = VirtualClock()
    agg = TracezAggregator(samples_per_bucket=3, error_samples=2, sample_interval_ns=0)
    recs = [finished(clock, 5_000_000, status=500) for _ in range(10)]
    for rec in recs:
        agg.on_request_end(rec)
    (row,) = agg.summary()
    assert row.latency[3] == 10 and row.errors == 10
    kept = agg.samples(row.name, "latency", 3)
    assert [s.record for s in kept] == recs[::-1][:3]
    assert [s.record for s in agg.samples(row.name, "error")] == recs[::-1][:2]
    assert agg.evicted["samples"] == 7 and agg.evicted["error_samples"] == 8
    assert agg.samples(row.name, "latency", 9) == []
    assert agg.samples(row.name, "nonsense") == []
    assert agg.samples("no such span", "latency", 3) == []


def test_a_bucket_takes_at_most_one_sample_per_interval_of_record_time() -> None:
    clock = VirtualClock()
    agg = TracezAggregator(sample_interval_ns=10_000_000)
    # Each request lasts 4 ms, so they end 4 ms apart: every third one is kept.
    recs = [finished(clock, 4_000_000, status=500) for _ in range(7)]
    for rec in recs:
        agg.on_request_end(rec)
    (row,) = agg.summary()
    assert row.latency[3] == 7 and row.errors == 7  # every one counted
    kept = [recs[0], recs[3], recs[6]][::-1]  # ends at 4, 16 and 28 ms
    assert [s.record for s in agg.samples(row.name, "latency", 3)] == kept
    assert [s.record for s in agg.samples(row.name, "error")] == kept
    assert agg.evicted["interval"] == 4


def test_names_are_bounded_and_what_is_turned_away_is_counted() -> None:
    clock = VirtualClock()
    agg = TracezAggregator(max_names=2)
    for route in ("/a", "/b", "/c", "/c"):
        agg.on_request_end(finished(clock, 1, route=route))
    assert [r.name for r in agg.summary()] == ["http.server: GET /a", "http.server: GET /b"]
    assert agg.evicted["names"] == 2
    assert agg.requests == 4


def test_the_request_path_only_appends_until_the_batch_is_full() -> None:
    clock = VirtualClock()
    agg = TracezAggregator(fold_every=3)
    agg.on_request_end(finished(clock, 1))
    agg.on_request_end(finished(clock, 1))
    assert agg.requests == 0  # not folded yet: pending
    agg.on_request_end(finished(clock, 1))
    assert agg.requests == 3  # the full batch folded on the request that filled it
    agg.on_request_end(finished(clock, 1))
    assert agg.summary()[0].latency[0] == 4


def test_error_rules_follow_the_span_status() -> None:
    clock = VirtualClock()
    agg = TracezAggregator(sample_interval_ns=0)
    agg.on_request_end(finished(clock, 1, status=404))
    agg.on_request_end(finished(clock, 1, status=503))
    fault = finished(clock, 1)
    fault.system_fault = True
    agg.on_request_end(fault)
    (row,) = agg.summary()
    assert row.errors == 2
    assert {s.record.status for s in agg.samples(row.name, "error")} == {200, 503}


def job(index: int, outcome: Outcome | None, *, required: bool = True) -> JobState:
    j = JobState(
        index=index,
        kind="effect",
        name="db.get t",
        queue="effects",
        step_index=1,
        effect=DbGet(table="t", key="1", required=required),
    )
    j.enqueue_ts, j.end_ts, j.outcome = 0, 50_000, outcome
    return j


def test_job_spans_are_named_and_errored_as_the_trace_engine_does() -> None:
    rec = finished(VirtualClock(), 100_000)
    rec.jobs = [
        job(0, "complete"),
        job(1, "fail"),
        job(2, "fail", required=False),
        job(3, "cancel"),
        job(4, None),
    ]
    samples = list(span_names(rec))
    assert [s.name for s in samples] == ["http.server: GET /r", *["db.get t"] * 5]
    assert [s.error for s in samples] == [False, False, True, False, False, True]
    assert [s.duration_ns for s in samples] == [100_000, *[50_000] * 5]


def test_a_consumed_message_is_counted_under_its_process_span() -> None:
    rec = finished(VirtualClock(), 1, status=500)
    rec.kind, rec.route = "consumer", "orders"
    (root,) = span_names(rec)
    assert (root.name, root.error) == ("queue.process orders", True)


@step
def answer(ctx: Context) -> Done:
    return Done(Response.json({"v": ctx.optional(V)}))


@step
def load(ctx: Context) -> Need:
    return Need([DbGet(table="t", key="1", slot=V)], then=answer)


@pytest.mark.anyio
async def test_running_requests_counted_and_released_when_cancelled() -> None:
    app, _clock, fake = app_with_fake_db("running", load_settings({}, zpages=True))
    gate = anyio.Event()
    fake.on("db.get t", result=1, gate=gate)
    app.get("/slow", load)
    zpages = app._zpages
    assert zpages is not None
    agg = zpages.aggregator
    async with app.lifespan():
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(app.dispatch, Request.from_target("GET", "/slow"))
            await anyio.wait_all_tasks_blocked()
            rows = {r.name: r for r in agg.summary()}
            assert agg.running == 2
            assert rows["http.server: GET /slow"].running == 2
            assert rows["db.get t"].running == 2
            assert len(agg.samples("db.get t", "running")) == 2
            tg.cancel_scope.cancel()  # as the server does when the client disconnects
        assert agg.running == 0
        rows = {r.name: r for r in agg.summary()}
        assert rows["http.server: GET /slow"].running == 0
        assert sum(rows["http.server: GET /slow"].latency) == 2
        assert {s.record.status for s in agg.samples("db.get t", "latency", 0)} == {499}
        # A request that completes is released too.
        fake.rules.clear()
        fake.on("db.get t", result=1, work_ms=0.01)  # exactly 10µs on the virtual clock
        resp = await app.dispatch(Request.from_target("GET", "/slow"))
        assert resp.status == 200 and agg.running == 0
        rows = {r.name: r for r in agg.summary()}
        assert rows["db.get t"].latency[1] == 1  # [10µs, 100µs): the edge opens it


@pytest.mark.anyio
async def test_the_running_registry_is_bounded() -> None:
    app, _clock, fake = app_with_fake_db("bounded", load_settings({}, zpages=True))
    fake.on("db.get t", result=1, gate=anyio.Event())
    app.get("/slow", load)
    assert app._zpages is not None
    agg = app._zpages.aggregator
    agg.max_running = 1
    async with app.lifespan(), anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(app.dispatch, Request.from_target("GET", "/slow"))
        await anyio.wait_all_tasks_blocked()
        assert agg.running == 1 and agg.evicted["running"] == 2
        tg.cancel_scope.cancel()
    assert agg.running == 0


@pytest.mark.anyio
async def test_a_failed_required_effect_is_an_error_of_its_span() -> None:
    app, _clock, fake = app_with_fake_db("errors", load_settings({}, zpages=True))
    fake.on("db.get t", error=EffectError("down", kind="unavailable"), fail_times=0)
    app.get("/f", load)
    assert app._zpages is not None
    agg = app._zpages.aggregator
    async with app.lifespan():
        resp = await app.dispatch(Request.from_target("GET", "/f"))
    rows = {r.name: r for r in agg.summary()}
    assert resp.status >= 500
    assert rows["db.get t"].errors == 1
    (sample,) = agg.samples("db.get t", "error")
    assert sample.job_index == 0 and sample.record.status == resp.status


_JOB = st.tuples(
    st.sampled_from(["db.get t", "cache.get a", "step.render.resume"]),
    st.sampled_from(["complete", "fail", "cancel", None]),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 10**7)),
    st.one_of(st.none(), st.integers(0, 10**12)),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([("http", "GET", "/a"), ("http", "POST", None), ("consumer", "", "q")]),
            st.integers(0, 10**12),
            st.sampled_from([200, 404, 499, 500, 503]),
            st.booleans(),
            st.lists(_JOB, max_size=4),
        ),
        max_size=40,
    ),
    st.integers(1, 17),
)
def test_folding_counts_what_span_names_says(records: list[Any], fold_every: int) -> None:
    """The fold, written for speed, against the readable rule (``span_names``)."""
    clock = VirtualClock()
    agg = TracezAggregator(fold_every=fold_every, sample_interval_ns=0)
    expected: dict[str, list[int]] = {}
    errors: dict[str, int] = {}
    for (kind, method, route), duration, status, fault, jobs in records:
        rec = finished(clock, duration, status=status, route=route or "")
        rec.kind, rec.method, rec.route, rec.system_fault = kind, method, route, fault
        for i, (name, outcome, required, enq, took) in enumerate(jobs):
            j = job(i, outcome, required=required)
            j.name = name
            j.enqueue_ts = None if enq is None else rec.start_ts + enq
            j.end_ts = None if took is None or enq is None else rec.start_ts + enq + took
            rec.jobs.append(j)
        for s in span_names(rec):
            expected.setdefault(s.name, [0] * 9)[latency_bucket(s.duration_ns)] += 1
            errors[s.name] = errors.get(s.name, 0) + s.error
        agg.on_request_end(rec)
    rows = {r.name: r for r in agg.summary()}
    assert {n: list(r.latency) for n, r in rows.items()} == expected
    assert {n: r.errors for n, r in rows.items()} == errors
    assert agg.requests == len(records)


def test_registering_a_running_request_is_the_registrys_own_add() -> None:
    """What a request pays at its start for tracez: a C call, no Python frame."""
    agg = TracezAggregator()
    assert isinstance(agg.started, types.BuiltinMethodType)
    rec = finished(VirtualClock(), 1)
    agg.started(rec)
    assert agg.running == 1
    agg.on_request_end(rec)
    assert agg.running == 0


def test_the_running_bound_is_kept_when_requests_end() -> None:
    clock = VirtualClock()
    agg = TracezAggregator(max_running=2)
    hanging = [finished(clock, 1) for _ in range(4)]
    for rec in hanging:
        agg.started(rec)
    done = finished(clock, 1)
    agg.started(done)
    agg.on_request_end(done)
    assert agg.evicted["running"] == 2 and agg.running == 2
    # Taken out of the registry, a request still counts when it ends.
    for rec in hanging:
        agg.on_request_end(rec)
    (row,) = agg.summary()
    assert agg.running == 0 and row.running == 0 and sum(row.latency) == 5
