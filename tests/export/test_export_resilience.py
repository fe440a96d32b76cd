from __future__ import annotations

import pytest
from export_helpers import PERMANENT, RETRY, FakeTimer, Scripted, make_span

from zerver.export import (
    BreakerState,
    CircuitBreaker,
    CircuitBreakerExporter,
    ExportConfig,
    ExportContext,
    ExportResult,
    ExportStatus,
    RateLimitedExporter,
    ResilienceBuilder,
    RetryingExporter,
    RetryPolicy,
    TokenBucket,
)
from zerver.export._base import SUCCESS

BATCH = [make_span(i) for i in range(10)]


def ctx(timer: FakeTimer, timeout: float = 30.0) -> ExportContext:
    return ExportContext(timer, timer.monotonic() + timeout)


class Counts:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n


# -- retry ----------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff_s=0.5, multiplier=2, max_backoff_s=3, jitter=0.2)
    assert [policy.backoff(n, 0.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.backoff(1, 0.5) == pytest.approx(0.45)
    assert policy.backoff(2, 0.999) == pytest.approx(0.8002)


def test_retries_transient_failures_then_succeeds() -> None:
    timer = FakeTimer()
    inner = Scripted(RETRY, RETRY, SUCCESS)
    counts = Counts()
    c = ExportContext(timer, timer.monotonic() + 30, counts)
    result = RetryingExporter(inner, rng=lambda: 0.0).export(BATCH, c)
    assert result.ok
    assert inner.calls == [10, 10, 10]
    assert timer.sleeps == [0.5, 1.0]
    assert counts.values == {"retries": 2}


def test_retry_after_replaces_backoff() -> None:
    timer = FakeTimer()
    hinted = ExportResult(ExportStatus.RETRYABLE, retry_after_s=1.0)
    zero = ExportResult(ExportStatus.RETRYABLE, retry_after_s=0.0)
    inner = Scripted(hinted, zero, SUCCESS)
    assert RetryingExporter(inner, rng=lambda: 0.0).export(BATCH, ctx(timer)).ok
    assert timer.sleeps == [1.0, 0.05]  # a zero hint is floored, never a spin


def test_permanent_failure_is_not_retried() -> None:
    timer = FakeTimer()
    inner = Scripted(PERMANENT, SUCCESS)
    result = RetryingExporter(inner).export(BATCH, ctx(timer))
    assert result.status is ExportStatus.PERMANENT
    assert inner.calls == [10]
    assert timer.sleeps == []


def test_gives_up_without_sleeping_when_the_deadline_is_too_close() -> None:
    timer = FakeTimer()
    inner = Scripted(RETRY)
    policy = RetryPolicy(initial_backoff_s=1.0, jitter=0.0)
    result = RetryingExporter(inner, policy).export(BATCH, ctx(timer, timeout=3.5))
    assert result.status is ExportStatus.RETRYABLE
    assert timer.sleeps == [1.0, 2.0]  # a third wait (4 s) would pass the 3.5 s deadline
    assert len(inner.calls) == 3


def test_retry_after_longer_than_deadline_gives_up() -> None:
    timer = FakeTimer()
    inner = Scripted(ExportResult(ExportStatus.RETRYABLE, retry_after_s=60))
    result = RetryingExporter(inner).export(BATCH, ctx(timer, timeout=10))
    assert result.status is ExportStatus.RETRYABLE
    assert timer.sleeps == []


def test_max_attempts() -> None:
    timer = FakeTimer()
    inner = Scripted(RETRY)
    RetryingExporter(inner, RetryPolicy(max_attempts=3)).export(BATCH, ctx(timer))
    assert len(inner.calls) == 3


# -- circuit breaker ------------------------------------------------------------


def state(b: CircuitBreaker) -> BreakerState:
    return b.state  # a call, so mypy does not keep an earlier narrowing


def test_breaker_state_machine() -> None:
    b = CircuitBreaker(failure_threshold=2, cooldown_s=10, success_threshold=2)
    assert b.before_call(0) == 0
    b.on_failure(0)
    assert state(b) is BreakerState.CLOSED
    b.on_success()  # resets the consecutive count
    b.on_failure(1)
    b.on_failure(2)
    assert (state(b), b.openings) == (BreakerState.OPEN, 1)
    assert b.before_call(5) == pytest.approx(7)
    assert b.before_call(12) == 0
    assert state(b) is BreakerState.HALF_OPEN
    b.on_failure(12)  # a failed probe re-opens at once
    assert (state(b), b.openings) == (BreakerState.OPEN, 2)
    assert b.before_call(21) == pytest.approx(1)
    assert b.before_call(22) == 0
    b.on_success()
    assert state(b) is BreakerState.HALF_OPEN
    b.on_success()
    assert state(b) is BreakerState.CLOSED


def test_breaker_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="failure_threshold >= 1"):
        CircuitBreaker(0, 1, 1)


def test_breaker_exporter_defers_without_calling_backend_while_open() -> None:
    timer = FakeTimer()
    inner = Scripted(RETRY, RETRY, SUCCESS)
    exporter = CircuitBreakerExporter(inner, CircuitBreaker(2, 5.0, 1))
    assert exporter.export(BATCH, ctx(timer)).status is ExportStatus.RETRYABLE
    assert exporter.export(BATCH, ctx(timer)).status is ExportStatus.RETRYABLE
    deferred = exporter.export(BATCH, ctx(timer))
    assert deferred.status is ExportStatus.DEFERRED
    assert deferred.retry_after_s == pytest.approx(5.0)
    assert len(inner.calls) == 2
    timer.advance(5.0)
    assert exporter.export(BATCH, ctx(timer)).ok  # the half-open probe
    assert exporter.breaker.state is BreakerState.CLOSED


def test_permanent_refusal_counts_as_backend_up() -> None:
    timer = FakeTimer()
    exporter = CircuitBreakerExporter(Scripted(RETRY, PERMANENT, RETRY), CircuitBreaker(2, 5, 1))
    for _ in range(3):
        exporter.export(BATCH, ctx(timer))
    assert exporter.breaker.state is BreakerState.CLOSED


# -- rate limit -----------------------------------------------------------------


def test_token_bucket_allows_debt_and_recovers_at_rate() -> None:
    bucket = TokenBucket(100.0)
    assert bucket.wait_time(0.0) == 0
    bucket.charge(250, 0.0)  # a batch bigger than the bucket still passes once
    assert bucket.wait_time(0.0) == pytest.approx(1.5)
    assert bucket.wait_time(1.0) == pytest.approx(0.5)
    assert bucket.wait_time(1.6) == 0
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_rate_limiter_defers_by_spans_and_bytes() -> None:
    timer = FakeTimer()
    counts = Counts()
    sized = ExportResult(ExportStatus.SUCCESS, bytes_sent=1000)
    exporter = RateLimitedExporter(Scripted(sized), spans_per_s=10, bytes_per_s=500)
    c = ExportContext(timer, timer.monotonic() + 30, counts)
    assert exporter.export(BATCH, c).ok
    deferred = exporter.export(BATCH, c)
    assert deferred.status is ExportStatus.DEFERRED
    assert deferred.retry_after_s == pytest.approx(1.0)  # max(10 spans @ 10/s, 500 bytes @ 500/s)
    timer.advance(1.0)
    assert exporter.export(BATCH, c).ok
    assert counts.values == {"rate_limited": 1}


# -- builder --------------------------------------------------------------------


def chain(exporter: object) -> list[str]:
    names = []
    while exporter is not None:
        names.append(type(exporter).__name__)
        exporter = getattr(exporter, "inner", None)
    return names


def test_builder_stacks_in_the_one_sensible_order() -> None:
    inner = Scripted()
    built = (
        ResilienceBuilder(inner)
        .rate_limit(spans_per_s=5)
        .circuit_breaker(failures=3)
        .retry(RetryPolicy(max_attempts=2))
        .build()
    )
    assert chain(built) == [
        "RateLimitedExporter",
        "CircuitBreakerExporter",
        "RetryingExporter",
        "Scripted",
    ]
    assert chain(ResilienceBuilder(inner).build()) == ["Scripted"]


def test_builder_from_config() -> None:
    inner = Scripted()
    cfg = ExportConfig.from_env({"ZER_VER_EXPORT_BREAKER_FAILURES": "0"})
    assert chain(ResilienceBuilder.from_config(inner, cfg).build()) == [
        "RetryingExporter",
        "Scripted",
    ]
    cfg = ExportConfig.from_env({"ZER_VER_EXPORT_RATE_BYTES": "1000"})
    built = ResilienceBuilder.from_config(inner, cfg).build()
    assert chain(built)[0] == "RateLimitedExporter"
    assert isinstance(getattr(built, "inner", None), CircuitBreakerExporter)
