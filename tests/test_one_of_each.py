"""One concept, one class: the retry policy, the token bucket, the concurrency
limiter and the span sinks that the runtime and the exporter share."""

from __future__ import annotations

import io
import math
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zerver
import zerver.export
from zerver import (
    ConcurrencyLimiter,
    ConsoleSpanSink,
    InMemorySpanSink,
    JobContext,
    RateLimiter,
    RetryPolicy,
    SpanSink,
    VirtualClock,
)
from zerver.core._clock import TokenBucket
from zerver.export import (
    ExportContext,
    ExportPipeline,
    ExportStatus,
    InstrumentationScope,
    Resource,
    RetryingExporter,
    SpanData,
)
from zerver.export._resilience import EXPORT_RETRY
from zerver.export._sinks import _SpanStore, traces_text
from zerver.trace import JobState

pytestmark = pytest.mark.anyio


RESOURCE = Resource(attributes={"service.name": "one-of-each"})
SCOPE = InstrumentationScope(name="zerver")


def span(i: int, name: str = "work", parent: int = 0) -> SpanData:
    return SpanData(
        name=name,
        trace_id=0xABC,
        span_id=i,
        parent_span_id=parent,
        start_ns=1_000_000 * i,
        end_ns=1_000_000 * i + 250_000,
        resource=RESOURCE,
        scope=SCOPE,
    )


def job(clock: VirtualClock) -> JobContext:
    return JobContext(
        JobState(index=0, kind="effect", name="e", queue="effects", step_index=0), clock
    )


# -- one RetryPolicy ------------------------------------------------------------------


def test_the_exporters_retry_policy_is_the_effects_class_in_milliseconds() -> None:
    policy = zerver.export.RetryPolicy(
        initial_backoff_s=0.5, max_backoff_s=3, jitter=0.2, max_attempts=4, min_retry_after_s=0.1
    )
    assert type(policy) is RetryPolicy
    assert policy == RetryPolicy(
        max_attempts=4, backoff_ms=500, max_backoff_ms=3000, jitter=0.2, min_retry_after_ms=100
    )
    assert zerver.export.RetryPolicy() == EXPORT_RETRY
    assert (EXPORT_RETRY.max_attempts, EXPORT_RETRY.backoff_ms, EXPORT_RETRY.max_backoff_ms) == (
        0,
        500.0,
        30_000.0,
    )


def test_delay_is_exponential_capped_and_only_shortened_by_jitter() -> None:
    policy = RetryPolicy(backoff_ms=10, multiplier=2, max_backoff_ms=50, jitter=0.5)
    assert [policy.delay_ms(n, 0.0) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 50, 50]
    assert policy.delay_ms(1, 0.5) == 7.5
    assert policy.backoff(2, 0.0) == 0.02  # the former seconds method


@settings(max_examples=60, deadline=None)
@given(
    attempt=st.integers(1, 40),
    rnd=st.floats(0.0, 1.0, exclude_max=True),
    backoff_ms=st.floats(0, 10_000),
    multiplier=st.floats(1, 10),
    cap=st.floats(0, 60_000),
    jitter=st.floats(0, 1),
)
def test_delay_never_exceeds_the_cap(
    attempt: int, rnd: float, backoff_ms: float, multiplier: float, cap: float, jitter: float
) -> None:
    policy = RetryPolicy(
        backoff_ms=backoff_ms, multiplier=multiplier, max_backoff_ms=cap, jitter=jitter
    )
    delay = policy.delay_ms(attempt, rnd)
    assert 0.0 <= delay <= cap
    assert math.isfinite(delay)


def test_attempt_count_convention() -> None:
    assert not RetryPolicy().gives_up(0) and RetryPolicy().gives_up(1)  # 1 = no retry
    three = RetryPolicy(max_attempts=3)
    assert [three.gives_up(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    assert not any(RetryPolicy(max_attempts=0).gives_up(n) for n in (1, 10, 10_000))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_attempts": -1}, "max_attempts"),
        ({"backoff_ms": -1}, "back-off"),
        ({"max_backoff_ms": -0.5}, "back-off"),
        ({"min_retry_after_ms": -1}, "back-off"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
    ],
)
def test_bad_retry_settings_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RetryPolicy(**kwargs)


def test_retrying_exporter_counts_attempts_as_effects_do() -> None:
    calls: list[float] = []

    class Flaky:
        def export(self, spans: Any, ctx: ExportContext) -> Any:
            calls.append(ctx.now())
            return zerver.export.ExportResult(ExportStatus.RETRYABLE)

        def shutdown(self) -> None:
            pass

    class Timer:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

        def wake(self) -> None:
            pass

    timer = Timer()
    policy = RetryPolicy(max_attempts=3, backoff_ms=100, jitter=0)
    result = RetryingExporter(Flaky(), policy).export([], ExportContext(timer, 60.0))
    assert result.status is ExportStatus.RETRYABLE
    assert calls == [0.0, 0.1, pytest.approx(0.3)]


# -- one token bucket -----------------------------------------------------------------


def test_one_token_bucket_behind_both_rate_limits() -> None:
    assert zerver.export.TokenBucket is TokenBucket
    limiter = RateLimiter("api", rate=10, burst=2, clock=VirtualClock())
    assert isinstance(limiter._bucket, TokenBucket)


def test_take_never_goes_into_debt_and_charge_may() -> None:
    bucket = TokenBucket(10.0, capacity=2)
    assert bucket.try_take(0.0) and bucket.try_take(0.0)
    assert not bucket.try_take(0.0)
    assert bucket.tokens == 0.0
    assert bucket.wait_for(0.0) == pytest.approx(0.1)
    bucket.charge(5, 0.0)
    assert bucket.tokens == -5.0
    assert bucket.wait_time(0.0) == pytest.approx(0.5)
    assert bucket.wait_time(0.5) == 0.0
    assert bucket.try_take(0.7)


def test_nanosecond_and_second_ticks_meter_the_same() -> None:
    ns = TokenBucket(4.0, capacity=1, ticks_per_s=1e9)
    s = TokenBucket(4.0, capacity=1)
    for i in range(12):
        t = i * 0.125
        assert ns.try_take(round(t * 1e9)) == s.try_take(t)


@pytest.mark.parametrize(
    "kwargs", [{"rate": 0}, {"rate": -1}, {"rate": 1, "capacity": 0}, {"rate": 1, "ticks_per_s": 0}]
)
def test_bad_bucket_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(**kwargs)


async def test_rate_limiter_parks_exactly_until_the_next_token() -> None:
    clock = VirtualClock()
    limiter = RateLimiter("api", rate=10, burst=1, clock=clock)
    ctx = job(clock)
    await limiter.acquire(ctx)
    await limiter.acquire(ctx)
    (episode,) = ctx.state.park_episodes
    assert (episode.cause, episode.token) == ("rate_limit", "api")
    assert (episode.resume_ts or 0) - episode.park_ts == 100_000_000


# -- one concurrency limiter: exact park records, FIFO, no overtaking -----------------


async def test_limiter_records_and_serves_in_arrival_order() -> None:
    clock = VirtualClock()
    limiter = ConcurrencyLimiter("pool", 2)
    await limiter.acquire()
    await limiter.acquire()
    served: list[int] = []
    contexts = [job(clock) for _ in range(4)]

    async def waiter(i: int) -> None:
        await limiter.acquire(contexts[i])
        served.append(i)
        limiter.release()

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(waiter, i)
        await anyio.wait_all_tasks_blocked()
        assert limiter.waiting == 4
        limiter.release()
        # a newcomer finds the freed slot already handed over: it must queue too
        assert limiter.in_use == 2
        tg.start_soon(waiter, 3 + 0)  # the same job again, arriving last
        await anyio.wait_all_tasks_blocked()
        limiter.release()
    assert served == [0, 1, 2, 3, 3]
    for ctx in contexts[:3]:
        (episode,) = ctx.state.park_episodes
        assert (episode.cause, episode.token) == ("backpressure", "pool")
        assert (episode.limit_current, episode.limit_max) == (2, 2)


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    limiter = ConcurrencyLimiter("pool", 1)
    await limiter.acquire()
    with anyio.move_on_after(0):
        await limiter.acquire()
    assert (limiter.in_use, limiter.waiting) == (1, 0)
    limiter.release()
    assert limiter.in_use == 0
    with pytest.raises(RuntimeError, match="released more often"):
        limiter.release()


# -- one span-sink protocol, one in-memory and one console sink -----------------------


def test_sinks_satisfy_the_one_protocol_and_the_exporter_contract() -> None:
    def feed(sink: SpanSink) -> None:
        sink.export([span(1)])

    memory = InMemorySpanSink()
    feed(memory)
    feed(ConsoleSpanSink(io.StringIO()))
    assert [s.span_id for s in memory.spans] == [1]
    assert memory.export([span(2)], ExportContext.with_timeout(1)).ok
    assert memory.batches == 2 and [len(t) for t in memory.traces] == [1, 1]


def test_in_memory_sink_bounds_and_counts() -> None:
    memory = InMemorySpanSink(maxlen=3)
    memory.export([span(i) for i in range(5)])
    assert [s.span_id for s in memory.spans] == [2, 3, 4]
    assert memory.dropped == 2
    memory.clear()
    assert (memory.spans, memory.batches) == ([], 0)


def test_in_memory_sink_as_a_pipeline_exporter() -> None:
    memory = InMemorySpanSink(maxlen=None)
    pipeline = ExportPipeline(memory, schedule_delay_s=0)
    for i in range(3):
        pipeline.submit(span(i + 1))
    assert pipeline.shutdown(5).completed
    assert sorted(s.span_id for s in memory.spans) == [1, 2, 3]
    assert memory.closed


def test_deprecated_names_lead_to_the_one_implementation() -> None:
    console = zerver.export.ConsoleExporter(io.StringIO())
    assert type(console) is ConsoleSpanSink and console.layout == "lines"
    old = zerver.export.InMemoryExporter()
    assert isinstance(old, _SpanStore) and isinstance(InMemorySpanSink(), _SpanStore)
    old.export([span(1)], ExportContext.with_timeout(1))
    assert [s.span_id for s in old.spans] == [1]
    assert old.batches == 1


def test_console_layouts() -> None:
    root, child = span(1, "GET /"), span(2, "db.get t", parent=1)
    tree, lines = io.StringIO(), io.StringIO()
    ConsoleSpanSink(tree).export([root, child])
    result = ConsoleSpanSink(lines, layout="lines").export([root, child])
    # One tree formatter: the sink draws what the console exporter draws.
    assert tree.getvalue() == traces_text([root, child])
    assert tree.getvalue().splitlines()[2].startswith("    db.get t")  # under its parent
    assert result.ok and result.bytes_sent == len(lines.getvalue())
    assert lines.getvalue().count("\n") == 2 and "parent=0000000000000001" in lines.getvalue()


def test_console_default_streams_are_looked_up_when_writing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ConsoleSpanSink().export([span(1)])
    ConsoleSpanSink(layout="lines").export([span(1)])
    out, err = capsys.readouterr()
    assert err.startswith("trace ") and out.startswith("INTERNAL work")


def test_console_write_failure_is_reported_not_raised() -> None:
    stream = io.StringIO()
    stream.close()
    result = ConsoleSpanSink(stream).export([span(1)])
    assert result.status is ExportStatus.PERMANENT and "console write failed" in result.detail


def test_bad_console_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="layout"):
        ConsoleSpanSink(layout="json")  # type: ignore[arg-type]
