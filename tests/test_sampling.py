"""Head and tail sampling: the SDK's rule, parent-based decisions on the wire, each
tail trigger, the rolling percentiles, and the variables that choose them."""

from __future__ import annotations

import math
import random
from typing import Any, cast

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.context import Context as OtelContext
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
from support import app_with_fake_db, served

from zerver import (
    App,
    ConfigError,
    Context,
    DbGet,
    Done,
    EffectError,
    Fail,
    HttpGet,
    Need,
    Response,
    Slot,
    VirtualClock,
    load_settings,
    step,
)
from zerver._specs import Window, parse_sampler
from zerver.testing import AppClient, FakeInterpreter, RecordCapture
from zerver.trace._records import ParkEpisode, RequestRecord
from zerver.trace._sampling import (
    MIN_SAMPLES,
    RELATIVE_ERROR,
    HeadSampler,
    RollingQuantile,
    TailSampler,
    head_sampler,
)

TRACE_IDS = st.integers(min_value=1, max_value=(1 << 128) - 1)
RATIOS = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25, 1e-9]), st.floats(0.0, 1.0))
PARENTS = st.sampled_from([None, True, False])


def sdk_context(parent: bool | None, trace_id: int) -> OtelContext | None:
    """An OpenTelemetry context holding a valid remote parent with that sampled flag."""
    if parent is None:
        return None
    flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
    sc = SpanContext(trace_id, 0x00F067AA0BA902B7, is_remote=True, trace_flags=flags)
    return set_span_in_context(NonRecordingSpan(sc))


def sdk_decides(sampler: Sampler, trace_id: int, parent: bool | None) -> bool:
    result = sampler.should_sample(sdk_context(parent, trace_id), trace_id, "GET /")
    return result.decision is Decision.RECORD_AND_SAMPLE


# -- head: the SDK's rule -----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(trace_id=TRACE_IDS, ratio=RATIOS, parent=PARENTS)
def test_ratio_rule_is_the_sdks(trace_id: int, ratio: float, parent: bool | None) -> None:
    ours = HeadSampler(ratio, parent_based=False).decide(trace_id, parent)
    assert ours == sdk_decides(TraceIdRatioBased(ratio), trace_id, parent)


@settings(max_examples=300, deadline=None)
@given(trace_id=TRACE_IDS, ratio=RATIOS, parent=PARENTS)
def test_parent_based_rule_is_the_sdks(trace_id: int, ratio: float, parent: bool | None) -> None:
    ours = HeadSampler(ratio).decide(trace_id, parent)
    assert ours == sdk_decides(ParentBased(TraceIdRatioBased(ratio)), trace_id, parent)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("always_on", ALWAYS_ON),
        ("always_off", ALWAYS_OFF),
        ("parentbased_always_on", DEFAULT_ON),
        ("parentbased_always_off", DEFAULT_OFF),
        ("traceidratio", TraceIdRatioBased(0.3)),
        ("parentbased_traceidratio", ParentBased(TraceIdRatioBased(0.3))),
    ],
)
def test_each_standard_sampler_decides_as_the_sdks(name: str, reference: Sampler) -> None:
    spec = load_settings({"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": "0.3"})
    sampler = head_sampler(spec.sampler_spec)
    rng = random.Random(name)
    for _ in range(500):
        trace_id = rng.getrandbits(128) or 1
        for parent in (None, True, False):
            assert sampler.decide(trace_id, parent) == sdk_decides(reference, trace_id, parent)


@step
def hello(ctx: Context) -> Done:
    return Done(Response.text("ok"))


async def served_records(sampler: str, requests: int, **env: str) -> list[RequestRecord]:
    """Records of ``requests`` new-trace requests through an app with ``sampler``."""
    app = App(
        "s",
        settings=load_settings({"ZER_VER_SAMPLER": sampler, **env} if sampler else env),
        rng=random.Random(15),
    )
    capture = RecordCapture()
    app.subscribe(capture)
    app.get("/h", hello)
    async with AppClient(app) as c:
        for _ in range(requests):
            assert (await c.get("/h")).status == 200
    return list(capture.records)


@pytest.mark.anyio
async def test_a_quarter_of_new_traces_exactly_the_sdks_quarter() -> None:
    records = await served_records("head:0.25", 4000)
    sdk = TraceIdRatioBased(0.25)
    kept = {r.trace_id for r in records if r.trace_flags & 0x01}
    assert kept == {r.trace_id for r in records if sdk_decides(sdk, r.trace_id, None)}
    n, p = len(records), 0.25
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(len(kept) - n * p) <= 3 * sigma


@pytest.mark.anyio
@pytest.mark.parametrize(("sampler", "kept"), [("head:0", 0), ("head:1", 50), ("", 50)])
async def test_head_zero_keeps_none_and_head_one_all(sampler: str, kept: int) -> None:
    records = await served_records(sampler, 50)
    assert sum(r.trace_flags & 0x01 for r in records) == kept


@pytest.mark.anyio
async def test_zer_ver_sampler_wins_over_the_otel_pair() -> None:
    records = await served_records("head:1", 20, OTEL_TRACES_SAMPLER="always_off")
    assert all(r.trace_flags & 0x01 for r in records)
    records = await served_records("", 20, OTEL_TRACES_SAMPLER="always_off")
    assert not any(r.trace_flags & 0x01 for r in records)


# -- head: parent-based decisions on the wire -----------------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = f"00-{TRACE}-00f067aa0ba902b7-01"
UNSAMPLED = f"00-{TRACE}-00f067aa0ba902b7-00"
# Valid, with the Level 2 random flag: only the sampled bit may change.
UNSAMPLED_RANDOM = f"00-{TRACE}-00f067aa0ba902b7-02"
INVALID = f"00-{TRACE.upper()}-00f067aa0ba902b7-01"

DOWN: Slot[Any] = Slot("down")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "env",
    [
        {"ZER_VER_SAMPLER": "head:0"},
        {"ZER_VER_SAMPLER": "head:1"},
        {"ZER_VER_SAMPLER": "head:0.5"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
        {"OTEL_TRACES_SAMPLER": "always_on"},
        {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    ],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()),
)
async def test_outbound_traceparent_carries_the_decision(env: dict[str, str]) -> None:
    seen: list[str | None] = []

    @step
    def downstream(ctx: Context) -> Done:
        seen.append(cast(RequestRecord, ctx.record).traceparent)
        return Done(Response.text("down"))

    b = App("b", settings=load_settings({}))
    b.get("/down", downstream)
    sampler = head_sampler(load_settings(env).sampler_spec)
    async with served(b) as b_url:

        @step
        def call(ctx: Context) -> Need:
            return Need(HttpGet(url=f"{b_url}/down", slot=DOWN, timeout_ms=5000), then=hello)

        a = App("a", settings=load_settings(env), rng=random.Random(7))
        capture = RecordCapture()
        a.subscribe(capture)
        a.get("/call", call)
        async with served(a) as a_url, httpx.AsyncClient(timeout=10) as client:
            for incoming, parent in [
                (None, None),
                (SAMPLED, True),
                (UNSAMPLED, False),
                (UNSAMPLED_RANDOM, False),
                (INVALID, None),
            ]:
                for _ in range(4):
                    headers = {"traceparent": incoming} if incoming else {}
                    r = await client.get(f"{a_url}/call", headers=headers)
                    assert r.status_code == 200
                    record = capture.last
                    expected = sampler.decide(record.trace_id, parent)
                    assert bool(record.trace_flags & 0x01) == expected
                    outbound = seen[-1]
                    assert outbound is not None
                    assert outbound.split("-")[1] == f"{record.trace_id:032x}"
                    flags = int(outbound.split("-")[3], 16)
                    assert bool(flags & 0x01) == expected
                    if incoming == UNSAMPLED_RANDOM:
                        assert flags & 0x02  # the other known bit travels unchanged
                    if parent is not None:
                        assert outbound.split("-")[1] == TRACE


# -- tail triggers, with the virtual clock and a fake interpreter ---------------------------


def tail_app(sampler: str) -> tuple[App, VirtualClock, FakeInterpreter, RecordCapture]:
    app, clock, fake = app_with_fake_db(
        "t", load_settings({"ZER_VER_SAMPLER": sampler}), rng=random.Random(1)
    )
    capture = RecordCapture()
    app.subscribe(capture)
    return app, clock, fake, capture


def sampler_for(app: App) -> TailSampler:
    s = app.settings
    return TailSampler(s.sampler_spec.tail, window=s.route_window, min_wait_ms=s.promote_p95_min_ms)


@step
def ok(ctx: Context) -> Done:
    return Done(Response.text("ok"))


@step
def ask(ctx: Context) -> Need:
    return Need(DbGet(table="t", key="k", slot=DOWN), then=ok)


@pytest.mark.anyio
async def test_error_keeps_5xx_and_faults_only() -> None:
    app, _clock, _fake, capture = tail_app("head:0,tail:error")

    @step
    def fail(ctx: Context) -> Fail:
        return Fail(int(ctx.params["code"]), "no")

    @step
    def boom(ctx: Context) -> Done:
        raise RuntimeError("broken")

    app.get("/fail/{code}", fail)
    app.get("/boom", boom)
    app.get("/ok", ok)
    async with AppClient(app) as c:
        for path in ["/ok", "/fail/404", "/fail/500", "/fail/503", "/boom", "/missing"]:
            await c.get(path)
    tail = sampler_for(app)
    reasons = [tail.decide(r) for r in capture.records]
    assert reasons == [None, None, "tail:error", "tail:error", "tail:error", None]


@pytest.mark.anyio
async def test_head_keeps_are_reason_head_and_triggers_only_see_dropped() -> None:
    app, _clock, _fake, capture = tail_app("head:1,tail:error")
    app.get("/ok", ok)
    async with AppClient(app) as c:
        await c.get("/ok")
    assert sampler_for(app).decide(capture.last) == "head"


@pytest.mark.anyio
async def test_required_failure_ignores_optional_and_successful_effects() -> None:
    app, _clock, fake, capture = tail_app("head:0,tail:required_failure")
    fake.on("db.get bad", error=EffectError("nope", kind="db_error"))
    fake.on("db.get good", result=1)

    def asking(table: str, required: bool) -> Any:
        @step(name=f"ask_{table}_{required}")
        def ask(ctx: Context) -> Need:
            return Need(DbGet(table=table, key="k", slot=DOWN, required=required), then=ok)

        return ask

    for table in ("bad", "good"):
        for required in (True, False):
            app.get(f"/{table}/{int(required)}", asking(table, required))
    async with AppClient(app) as c:
        for path in ["/good/1", "/good/0", "/bad/0", "/bad/1"]:
            await c.get(path)
    tail = sampler_for(app)
    assert [tail.decide(r) for r in capture.records] == [None, None, None, "tail:required_failure"]


@pytest.mark.anyio
async def test_latency_bar_is_inclusive() -> None:
    app, _clock, fake, capture = tail_app("head:0,tail:latency:250")
    work = fake.on("db.get t", result=1)

    app.get("/t", ask)
    async with AppClient(app) as c:
        for ms in (10.0, 249.0, 250.0, 900.0):
            work.work_ms = ms
            await c.get("/t")
    tail = sampler_for(app)
    assert [tail.decide(r) for r in capture.records] == [
        None,
        None,
        "tail:latency:250",
        "tail:latency:250",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("trigger", ["p95", "p99"])
async def test_percentile_triggers_fire_at_or_above_the_route_percentile(trigger: str) -> None:
    app, _clock, fake, capture = tail_app(f"head:0,tail:{trigger}")
    work = fake.on("db.get t", result=1)

    app.get("/t", ask)
    app.get("/other", ok)
    # 100 requests of 1..100 ms in shuffled order, then probes.
    durations = list(range(1, 101))
    random.Random(3).shuffle(durations)
    probes = [5.0, 94.0, 100.0, 250.0]
    async with AppClient(app) as c:
        for whole in durations:
            work.work_ms = float(whole)
            await c.get("/t")
        for probe in probes:
            work.work_ms = probe
            await c.get("/t")
        await c.get("/other")  # its own route: no percentile yet
    tail = sampler_for(app)
    reasons = [tail.decide(r) for r in capture.records]
    window: list[float] = []
    q = 0.95 if trigger == "p95" else 0.99
    for record, reason in zip(capture.records, reasons, strict=True):
        if record.route != "/t":
            assert reason is None
            continue
        took = record.duration_ns / 1e6
        if len(window) < MIN_SAMPLES:
            assert reason is None  # no percentile yet: the trigger does not fire
        else:
            exact = sorted(window)[math.ceil(q * len(window)) - 1]
            if took >= exact * (1 + RELATIVE_ERROR):
                assert reason == f"tail:{trigger}"
            elif took < exact * (1 - RELATIVE_ERROR):
                assert reason is None
        window.append(took)
    assert reasons[-2] == f"tail:{trigger}"  # 250 ms is above every percentile
    assert reasons[-5] is None  # 5 ms is below it


@pytest.mark.anyio
async def test_slow_queue_fires_on_a_park_at_or_above_the_route_p95() -> None:
    app, _clock, fake, capture = tail_app("head:0,tail:slow_queue")
    rule = fake.on("db.get t", result=1)

    app.get("/t", ask)
    async with AppClient(app) as c:
        for i in range(40):
            rule.parks = [("backpressure", 2.0 + (i % 4), "db_pool")]
            await c.get("/t")
        for ms in (0.5, 3.0, 40.0):
            rule.parks = [("backpressure", ms, "db_pool")]
            await c.get("/t")
    tail = sampler_for(app)
    reasons = [tail.decide(r) for r in capture.records]
    assert all(r is None for r in reasons[:MIN_SAMPLES])
    # Parks of 2..5 ms: the p95 is 5 ms; only 40 ms (and earlier 5 ms parks) reach it.
    assert reasons[-3:] == [None, None, "tail:slow_queue"]
    assert all(reason in (None, "tail:slow_queue") for reason in reasons[MIN_SAMPLES:-3])


def record_with(
    *,
    route: str = "/r",
    duration_ms: float = 1.0,
    queue_wait_ms: float | None = None,
    park_ms: float | None = None,
    status: int = 200,
    start: int = 0,
) -> RequestRecord:
    """A finished, head-dropped record built by hand (times from a virtual clock)."""
    from zerver.trace._records import JobState

    clock = VirtualClock(start)
    record = RequestRecord(clock, random.Random(0))
    record.trace_flags = 0
    record.method, record.route = "GET", route
    if queue_wait_ms is not None or park_ms is not None:
        job = JobState(index=0, kind="effect", name="db.get t", queue="effects", step_index=0)
        job.enqueue_ts = start
        job.take_ts = start + round((queue_wait_ms or 0.0) * 1e6)
        job.start_ts = job.take_ts
        if park_ms is not None:
            ep = ParkEpisode("io_wait", job.start_ts)
            ep.resume_ts = job.start_ts + round(park_ms * 1e6)
            job.park_episodes.append(ep)
        job.end_ts = job.start_ts + round((park_ms or 0.0) * 1e6)
        job.outcome = "complete"
        record.jobs.append(job)
    clock.advance_ms(duration_ms)
    record.finish(status, 0)
    return record


def test_slow_queue_on_queue_waits_with_a_floor() -> None:
    tail = TailSampler(["slow_queue"], window=Window(count=100), min_wait_ms=1.0)
    # Every wait zero: the p95 is 0, but waits under the floor never count.
    for _ in range(30):
        assert tail.decide(record_with(queue_wait_ms=0.0)) is None
    assert tail.decide(record_with(queue_wait_ms=0.5)) is None
    assert tail.decide(record_with(queue_wait_ms=1.0)) == "tail:slow_queue"
    assert tail.decide(record_with()) is None  # no job at all


def test_first_matching_trigger_in_configured_order_names_the_reason() -> None:
    record = record_with(duration_ms=900.0, status=503)
    assert TailSampler(["latency:100", "error"]).decide(record) == "tail:latency:100"
    assert TailSampler(["error", "latency:100"]).decide(record) == "tail:error"
    assert TailSampler([]).decide(record) is None


def test_every_record_feeds_the_windows_sampled_or_not() -> None:
    tail = TailSampler(["p95"], window=Window(count=1000))
    for i in range(MIN_SAMPLES):
        record = record_with(duration_ms=10.0)
        record.trace_flags = i % 2  # half of them head-sampled
        tail.decide(record)
    assert tail.decide(record_with(duration_ms=10.0)) == "tail:p95"
    assert tail.decide(record_with(duration_ms=9.0)) is None
    assert tail.kept == {"head": MIN_SAMPLES // 2, "tail:p95": 1}


def test_time_windows_forget_and_routes_are_bounded() -> None:
    tail = TailSampler(["p99"], window=Window(seconds=1.0), max_routes=2)
    for i in range(MIN_SAMPLES):
        tail.decide(record_with(duration_ms=100.0, start=i))
    assert tail.decide(record_with(duration_ms=100.0, start=MIN_SAMPLES)) == "tail:p99"
    # Two seconds later the window is empty again: no percentile, no keep.
    assert tail.decide(record_with(duration_ms=500.0, start=2_000_000_000)) is None
    for route in ("/a", "/b", "/c"):
        tail.decide(record_with(route=route))
    assert len(tail._routes) == 2


def test_unknown_trigger_is_refused() -> None:
    with pytest.raises(ValueError, match="nope"):
        TailSampler(["nope"])
    with pytest.raises(ValueError, match="latency:0"):
        TailSampler(["latency:0"])


# -- the rolling percentile estimate --------------------------------------------------------

SAMPLES = st.lists(
    st.one_of(
        st.floats(0.0, 1e6, allow_nan=False),
        st.sampled_from([0.0, 0.001, 1.0, 5.0, 1e7, 2e7]),
    ),
    min_size=1,
    max_size=400,
)


@settings(max_examples=200, deadline=None)
@given(
    samples=SAMPLES,
    size=st.integers(1, 300),
    q=st.sampled_from([0.5, 0.95, 0.99, 1.0]),
)
def test_estimate_is_the_exact_window_percentile_within_the_stated_error(
    samples: list[float], size: int, q: float
) -> None:
    rq = RollingQuantile(Window(count=size))
    for i, s in enumerate(samples):
        rq.add(i, s)
    window = samples[-size:]
    assert len(rq) == len(window)
    estimate = rq.quantile(q)
    if len(window) < MIN_SAMPLES:
        assert estimate == math.inf
        return
    exact = min(sorted(window)[math.ceil(q * len(window)) - 1], 1e7)
    if exact < 0.001:
        assert estimate == 0.0
    else:
        assert abs(estimate - exact) <= RELATIVE_ERROR * exact * (1 + 1e-9)


def test_memory_is_fixed_by_the_window() -> None:
    rq = RollingQuantile(Window(seconds=60.0, max_samples=64))
    for i in range(10_000):
        rq.add(i, float(i))
    assert len(rq) == 64
    assert rq.quantile(0.5) == pytest.approx(sorted(range(10_000))[-64:][31], rel=RELATIVE_ERROR)


# -- the variables ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "ratio", "parent_based", "tail"),
    [
        ({}, 1.0, True, ()),
        (
            {"ZER_VER_SAMPLER": "head:0.1,tail:error|latency:250.0"},
            0.1,
            True,
            ("error", "latency:250"),
        ),
        ({"ZER_VER_SAMPLER": "head:0,tail:latency:0.5|p99"}, 0.0, True, ("latency:0.5", "p99")),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, 1.0, False, ()),
        ({"OTEL_TRACES_SAMPLER": "ALWAYS_OFF"}, 0.0, False, ()),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, 1.0, False, ()),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.2"}, 0.2, False, ()),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, 1.0, True, ()),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 0.0, True, ()),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
            0.0,
            True,
            (),
        ),
        # The argument is read only by the ratio samplers.
        ({"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, 0.0, False, ()),
        ({"OTEL_TRACES_SAMPLER_ARG": "0.5"}, 1.0, True, ()),
        # ZER_VER_SAMPLER wins.
        ({"ZER_VER_SAMPLER": "head:0.5", "OTEL_TRACES_SAMPLER": "always_off"}, 0.5, True, ()),
        # Empty means unset.
        ({"ZER_VER_SAMPLER": " ", "OTEL_TRACES_SAMPLER": "always_off"}, 0.0, False, ()),
    ],
)
def test_sampler_variables(
    env: dict[str, str], ratio: float, parent_based: bool, tail: tuple[str, ...]
) -> None:
    spec = load_settings(env).sampler_spec
    assert (spec.head_ratio, spec.parent_based, spec.tail) == (ratio, parent_based, tail)


@pytest.mark.parametrize(
    ("var", "value", "accepted"),
    [
        ("OTEL_TRACES_SAMPLER", "jaeger_remote", "always_on, always_off, traceidratio"),
        ("OTEL_TRACES_SAMPLER", "parentbased", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "half", "a number from 0 to 1"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5", "a number from 0 to 1"),
        ("OTEL_TRACES_SAMPLER_ARG", "-0.1", "a number from 0 to 1"),
        ("OTEL_TRACES_SAMPLER_ARG", "nan", "a number from 0 to 1"),
        ("ZER_VER_SAMPLER", "head:0.5,tail:latency:", "latency:<ms>"),
        ("ZER_VER_SAMPLER", "head:0.5,tail:latency:0", "latency:<ms>"),
        ("ZER_VER_SAMPLER", "head:0.5,tail:latency:-5", "latency:<ms>"),
        ("ZER_VER_SAMPLER", "head:0.5,tail:latency:1|latency:2", "each at most once"),
        ("ZER_VER_SAMPLER", "head:0.5,tail:latency:fast", "latency:<ms>"),
        ("ZER_VER_SAMPLER", "head:inf", "head:<ratio 0..1>"),
        ("ZER_VER_SAMPLER", "head:nan", "head:<ratio 0..1>"),
    ],
)
def test_bad_sampler_values_are_one_line_errors(var: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({var: value})
    msg = str(err.value)
    assert msg.startswith(f"{var}={value!r} is invalid: ")
    assert accepted in msg and "\n" not in msg


@settings(max_examples=100, deadline=None)
@given(ms=st.floats(0.001, 1e6, allow_nan=False, allow_infinity=False))
def test_latency_trigger_round_trips(ms: float) -> None:
    (trigger,) = parse_sampler(f"head:0,tail:latency:{ms!r}").tail
    assert float(trigger.removeprefix("latency:")) == ms
    assert parse_sampler(f"head:0,tail:{trigger}").tail == (trigger,)
