"""Composable resilience layers: retry, circuit breaker, rate limit, and their builder.

The decision logic (:class:`CircuitBreaker`, :class:`TokenBucket`,
:meth:`zerver.RetryPolicy.delay_ms`) is sans-I/O and takes ``now`` as an argument; the
``*Exporter`` wrappers apply it around an inner exporter using the batch's
:class:`ExportContext` for time.

The builder always stacks them in one order, outermost first::

    rate limit → circuit breaker → retry → transport

because the other orders are wrong: a breaker inside the retry loop would
count every attempt as a failed batch, and a rate limiter inside the breaker
would make waiting for tokens look like backend trouble.

Circuit breaker rules::

    CLOSED    --N consecutive failed batches-->       OPEN (openings += 1)
    OPEN      --cool-down elapsed, next batch-->      HALF_OPEN (that batch is the probe)
    HALF_OPEN --probe failed-->                       OPEN (new cool-down)
    HALF_OPEN --M consecutive successful probes-->    CLOSED

"Failed" means the retry layer gave up on a transient failure. A permanent
refusal (HTTP 400) proves the backend is up and counts as a success. While
OPEN the breaker answers ``DEFERRED`` without calling the backend; the
pipeline then holds the batch and stops draining, so spans wait in its
bounded buffer.
"""

from __future__ import annotations

import enum
import random
import threading
from collections.abc import Callable, Sequence

from zerver.core._clock import TokenBucket
from zerver.core._effects import RetryPolicy as _RetryPolicy

from ._base import BatchExporter, ExportContext, ExportResult, ExportStatus, layers
from ._config import ExportConfig
from ._spans import SpanData

__all__ = [
    "EXPORT_RETRY",
    "BreakerState",
    "CircuitBreaker",
    "CircuitBreakerExporter",
    "RateLimitedExporter",
    "ResilienceBuilder",
    "RetryPolicy",
    "RetryingExporter",
    "TokenBucket",
]


EXPORT_RETRY = _RetryPolicy(
    max_attempts=0, backoff_ms=500.0, max_backoff_ms=30_000.0, jitter=0.2, min_retry_after_ms=50.0
)
"""The exporter's default: 0.5 s doubling to 30 s, up to 20 % shorter, until the deadline."""


def RetryPolicy(  # noqa: N802 -- keeps the old class's name callable
    *,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
    multiplier: float = 2.0,
    jitter: float = 0.2,
    max_attempts: int = 0,
    min_retry_after_s: float = 0.05,
) -> _RetryPolicy:
    """Deprecated: the exporter's retry settings in seconds, as a :class:`zerver.RetryPolicy`.

    ``zerver.RetryPolicy`` is the one retry policy (milliseconds); this keeps
    the former ``zerver.export.RetryPolicy`` keywords and defaults working and
    converts them. ``max_attempts`` = 0 means "until the deadline".
    """
    return _RetryPolicy(
        max_attempts=max_attempts,
        backoff_ms=initial_backoff_s * 1000.0,
        max_backoff_ms=max_backoff_s * 1000.0,
        multiplier=multiplier,
        jitter=jitter,
        min_retry_after_ms=min_retry_after_s * 1000.0,
    )


class RetryingExporter:
    """Retries ``RETRYABLE`` results until success, the attempt budget or the deadline.

    Gives up at once (without sleeping) when the next wait would pass the
    deadline. Counts each retry as ``retries``.
    """

    __slots__ = ("_rng", "inner", "policy")

    def __init__(
        self,
        inner: BatchExporter,
        policy: _RetryPolicy | None = None,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.inner = inner
        self.policy = policy or EXPORT_RETRY
        self._rng = rng

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        policy = self.policy
        retry = 0
        while True:
            result = self.inner.export(spans, ctx)
            if result.status is not ExportStatus.RETRYABLE:
                return result
            retry += 1
            if policy.gives_up(retry):
                return result
            if result.retry_after_s is not None:
                delay = max(result.retry_after_s, policy.min_retry_after_ms / 1000.0)
            else:
                delay = policy.delay_ms(retry, self._rng()) / 1000.0
            if delay >= ctx.remaining():
                return result
            ctx.stats.add("retries")
            ctx.timer.sleep(delay)

    def shutdown(self) -> None:
        self.inner.shutdown()


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """The breaker's state machine (rules in the module docstring). Thread-safe."""

    __slots__ = (
        "_failures",
        "_lock",
        "_opened_at",
        "_successes",
        "cooldown_s",
        "failure_threshold",
        "openings",
        "state",
        "success_threshold",
    )

    def __init__(
        self, failure_threshold: int = 5, cooldown_s: float = 30.0, success_threshold: int = 2
    ) -> None:
        if failure_threshold < 1 or success_threshold < 1 or cooldown_s <= 0:
            raise ValueError(
                "a circuit breaker needs failure_threshold >= 1, success_threshold >= 1 "
                f"and cooldown_s > 0 (got {failure_threshold}, {success_threshold}, {cooldown_s})"
            )
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.success_threshold = success_threshold
        self.state = BreakerState.CLOSED
        self.openings = 0
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._lock = threading.Lock()

    def remaining(self, now: float) -> float:
        """Seconds until a call may go ahead (0.0 if it may now); changes nothing."""
        with self._lock:
            if self.state is BreakerState.OPEN:
                return max(0.0, self._opened_at + self.cooldown_s - now)
            return 0.0

    def before_call(self, now: float) -> float:
        """0.0 if a call may go ahead now, else the seconds until it may."""
        with self._lock:
            if self.state is BreakerState.OPEN:
                wait = self._opened_at + self.cooldown_s - now
                if wait > 0:
                    return wait
                self.state = BreakerState.HALF_OPEN
                self._successes = 0
            return 0.0

    def on_success(self) -> None:
        with self._lock:
            self._failures = 0
            if self.state is BreakerState.HALF_OPEN:
                self._successes += 1
                if self._successes >= self.success_threshold:
                    self.state = BreakerState.CLOSED

    def on_failure(self, now: float) -> None:
        with self._lock:
            if self.state is BreakerState.HALF_OPEN:
                self._open(now)
                return
            self._failures += 1
            if self.state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
                self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.openings += 1
        self._opened_at = now
        self._failures = 0
        self._successes = 0


class CircuitBreakerExporter:
    """Answers ``DEFERRED`` while its :class:`CircuitBreaker` is open."""

    __slots__ = ("breaker", "inner")

    def __init__(self, inner: BatchExporter, breaker: CircuitBreaker | None = None) -> None:
        self.inner = inner
        self.breaker = breaker or CircuitBreaker()

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        wait = self.breaker.before_call(ctx.now())
        if wait > 0:
            ctx.stats.add("breaker_deferrals")
            return ExportResult(ExportStatus.DEFERRED, retry_after_s=wait, detail="circuit open")
        result = self.inner.export(spans, ctx)
        if result.status is ExportStatus.RETRYABLE:
            self.breaker.on_failure(ctx.now())
        elif result.status is not ExportStatus.DEFERRED:
            self.breaker.on_success()
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


class RateLimitedExporter:
    """Limits spans/s and/or bytes/s (0 = off); answers ``DEFERRED`` when over."""

    __slots__ = ("_bytes", "_spans", "inner")

    def __init__(
        self, inner: BatchExporter, *, spans_per_s: float = 0.0, bytes_per_s: float = 0.0
    ) -> None:
        self.inner = inner
        self._spans = TokenBucket(spans_per_s) if spans_per_s > 0 else None
        self._bytes = TokenBucket(bytes_per_s) if bytes_per_s > 0 else None

    def delay(self, now: float) -> float:
        """Seconds until the next batch may go (0.0: now)."""
        wait = 0.0
        if self._spans is not None:
            wait = self._spans.wait_time(now)
        if self._bytes is not None:
            wait = max(wait, self._bytes.wait_time(now))
        return wait

    def charge_spans(self, spans: int, now: float) -> None:
        if self._spans is not None:
            self._spans.charge(spans, now)

    def charge_bytes(self, sent: int, now: float) -> None:
        if self._bytes is not None and sent:
            self._bytes.charge(sent, now)

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        now = ctx.now()
        wait = self.delay(now)
        if wait > 0:
            ctx.stats.add("rate_limited")
            return ExportResult(ExportStatus.DEFERRED, retry_after_s=wait, detail="rate limited")
        self.charge_spans(len(spans), now)
        result = self.inner.export(spans, ctx)
        self.charge_bytes(result.bytes_sent, ctx.now())
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


class ResilienceBuilder:
    """Composes retry, circuit breaker and rate limit around an exporter.

    Example::

        exporter = (
            ResilienceBuilder(OtlpHttpExporter(endpoint))
            .retry(RetryPolicy(backoff_ms=1000.0))
            .circuit_breaker(failures=5, cooldown_s=30, successes=2)
            .rate_limit(spans_per_s=50_000)
            .build()
        )
    """

    def __init__(self, exporter: BatchExporter) -> None:
        self._exporter = exporter
        self._retry: _RetryPolicy | None = None
        self._rng: Callable[[], float] = random.random
        self._breaker: CircuitBreaker | None = None
        self._spans_per_s = 0.0
        self._bytes_per_s = 0.0

    @classmethod
    def from_config(
        cls, exporter: BatchExporter, config: ExportConfig, *, retry: bool = True
    ) -> ResilienceBuilder:
        """Retry (unless ``retry`` is False: a pipeline with a spool retries by
        replaying from it); breaker and rate limits as ``config`` says (0 = off)."""
        builder = cls(exporter)
        if retry:
            builder.retry()
        if config.breaker_failures > 0:
            builder.circuit_breaker(
                failures=config.breaker_failures,
                cooldown_s=config.breaker_cooldown_s,
                successes=config.breaker_successes,
            )
        return builder.rate_limit(
            spans_per_s=config.rate_spans_per_s, bytes_per_s=config.rate_bytes_per_s
        )

    def retry(
        self, policy: _RetryPolicy | None = None, *, rng: Callable[[], float] | None = None
    ) -> ResilienceBuilder:
        """Retry with ``policy`` (a :class:`zerver.RetryPolicy`; default :data:`EXPORT_RETRY`)."""
        self._retry = policy or EXPORT_RETRY
        if rng is not None:
            self._rng = rng
        return self

    def circuit_breaker(
        self, *, failures: int = 5, cooldown_s: float = 30.0, successes: int = 2
    ) -> ResilienceBuilder:
        self._breaker = CircuitBreaker(failures, cooldown_s, successes)
        return self

    def rate_limit(
        self, *, spans_per_s: float = 0.0, bytes_per_s: float = 0.0
    ) -> ResilienceBuilder:
        self._spans_per_s = spans_per_s
        self._bytes_per_s = bytes_per_s
        return self

    def build(self) -> BatchExporter:
        exporter = self._exporter
        if self._retry is not None:
            exporter = RetryingExporter(exporter, self._retry, rng=self._rng)
        if self._breaker is not None:
            exporter = CircuitBreakerExporter(exporter, self._breaker)
        if self._spans_per_s > 0 or self._bytes_per_s > 0:
            exporter = RateLimitedExporter(
                exporter, spans_per_s=self._spans_per_s, bytes_per_s=self._bytes_per_s
            )
        return exporter


def find_rate_limiter(exporter: object) -> RateLimitedExporter | None:
    """The first rate-limit layer in a layer chain."""
    return next(
        (layer for layer in layers(exporter) if isinstance(layer, RateLimitedExporter)), None
    )


def find_breaker(exporter: object) -> CircuitBreaker | None:
    """The first circuit breaker in a layer chain."""
    return next(
        (layer.breaker for layer in layers(exporter) if isinstance(layer, CircuitBreakerExporter)),
        None,
    )
