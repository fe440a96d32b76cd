"""The pipeline with a spool: what cannot be sent now goes to disk and comes back later.

A scripted transport stands in for the OTLP exporter (it encodes a batch to a
body the spool can keep and sends bodies back); the spool is a real one in
``tmp_path``. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import orjson
import pytest
import structlog
from export_helpers import make_span, wait_until

from zerver.export import (
    CircuitBreaker,
    CircuitBreakerExporter,
    DropReason,
    ExportContext,
    ExportPipeline,
    ExportResult,
    ExportStatus,
    RateLimitedExporter,
    RetryPolicy,
    Spool,
    SpoolItem,
)
from zerver.export._base import SUCCESS
from zerver.export._log import DropReporter
from zerver.export._spans import SpanData

FAST = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, jitter=0.0)


class Body(list[SpanData]):
    """A batch that carries its encoded body (what ``encode_ahead`` returns)."""

    body: bytes = b""


class Transport:
    """Encodes a batch as the JSON list of its span names; ``up`` says whether the
    backend answers. Records every attempt: (time, spans, replayed?)."""

    def __init__(self, *, up: bool = True, retry_after_s: float | None = None) -> None:
        self.up = up
        self.retry_after_s = retry_after_s
        self.attempts: list[tuple[float, int, bool]] = []
        self.received: list[str] = []
        self.lock = threading.Lock()

    def _answer(self, names: list[str], replayed: bool) -> ExportResult:
        with self.lock:
            self.attempts.append((time.monotonic(), len(names), replayed))
            if not self.up:
                return ExportResult(
                    ExportStatus.RETRYABLE, retry_after_s=self.retry_after_s, detail="HTTP 503"
                )
            self.received.extend(names)
        return ExportResult(ExportStatus.SUCCESS, bytes_sent=1)

    def encode_ahead(self, spans: Sequence[SpanData]) -> Sequence[SpanData]:
        batch = Body(spans)
        batch.body = orjson.dumps([s.name for s in spans])
        return batch

    def spool_body(self, spans: Sequence[SpanData]) -> tuple[bytes, dict[str, str], int]:
        body = spans.body if isinstance(spans, Body) else orjson.dumps([s.name for s in spans])
        return body, {"content_type": "application/test"}, 0

    def send_body(
        self, body: bytes, meta: Mapping[str, str], spans: int, ctx: ExportContext
    ) -> ExportResult:
        assert meta == {"content_type": "application/test"}
        return self._answer(orjson.loads(body), True)

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        return self._answer([s.name for s in spans], False)

    def shutdown(self) -> None:
        pass


def spans(n: int, prefix: str = "s") -> list[SpanData]:
    return [make_span(i, name=f"{prefix}{i}") for i in range(n)]


def spooled(tmp_path: Path, exporter: object, **kwargs: object) -> ExportPipeline:
    options: dict[str, object] = {
        "schedule_delay_s": 0.01,
        "max_export_batch_size": 10,
        "spool": Spool(tmp_path, max_bytes=1 << 30),
        "retry_policy": FAST,
    }
    options.update(kwargs)
    return ExportPipeline(exporter, **options)  # type: ignore[arg-type]


def test_a_failed_batch_is_spooled_then_replayed_once_the_backend_answers(
    tmp_path: Path,
) -> None:
    transport = Transport(up=False)
    p = spooled(tmp_path, transport)
    for s in spans(30):
        p.submit(s)
    assert wait_until(lambda: p.stats().spooled == 30)
    stats = p.stats()
    assert stats.dropped_total == 0 and stats.exported == 0
    assert stats.spool is not None and stats.spool.count == 30
    transport.up = True
    assert wait_until(lambda: p.stats().replayed == 30)
    assert sorted(transport.received) == sorted(f"s{i}" for i in range(30))
    report = p.shutdown(5)
    assert report.completed and report.not_sent == 0
    assert report.stats.dropped_total == 0


def test_no_attempt_is_made_while_backing_off(tmp_path: Path) -> None:
    transport = Transport(up=False)
    p = spooled(tmp_path, transport, retry_policy=RetryPolicy(initial_backoff_s=30, jitter=0))
    for s in spans(50):
        p.submit(s)
    assert wait_until(lambda: p.stats().spooled == 50)
    # One attempt failed; the other four batches went to disk without one.
    assert len(transport.attempts) == 1
    assert p.backing_off()
    p.shutdown(1)


def test_retry_after_is_a_floor_for_the_next_attempt(tmp_path: Path) -> None:
    transport = Transport(up=False, retry_after_s=0.3)
    p = spooled(tmp_path, transport)
    for s in spans(10):
        p.submit(s)
    assert wait_until(lambda: len(transport.attempts) >= 3)
    transport.up = True
    assert wait_until(lambda: p.stats().replayed == 10)
    times = [t for t, _, _ in transport.attempts]
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(times))
    p.shutdown(1)


def test_an_open_breaker_sends_batches_straight_to_the_spool(tmp_path: Path) -> None:
    transport = Transport(up=False)
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=60)
    p = spooled(tmp_path, CircuitBreakerExporter(transport, breaker))
    for s in spans(40):
        p.submit(s)
    assert wait_until(lambda: p.stats().spooled == 40)
    assert len(transport.attempts) == 1  # the one that opened it
    assert p.stats().breaker_state == "open"
    p.shutdown(1)


def test_a_rate_limit_holds_batches_instead_of_spooling_them(tmp_path: Path) -> None:
    transport = Transport()
    p = spooled(tmp_path, RateLimitedExporter(transport, spans_per_s=30))
    for s in spans(60):
        p.submit(s)
    assert p.force_flush(10)
    stats = p.stats()
    assert (stats.exported, stats.spooled) == (60, 0)
    assert stats.rate_limited > 0
    p.shutdown(1)


def test_shutdown_with_the_backend_down_spools_everything_at_once(tmp_path: Path) -> None:
    transport = Transport(up=False)
    p = spooled(tmp_path, transport, schedule_delay_s=60.0, max_export_batch_size=100)
    for s in spans(250):
        p.submit(s)
    started = time.monotonic()
    report = p.shutdown(30)
    assert time.monotonic() - started < 5  # not the 30 s deadline
    assert report.completed and report.not_sent == 0
    assert report.spooled == 250 and report.stats.dropped_total == 0
    assert len(transport.attempts) == 1  # the first failure: the rest was spooled unsent
    with Spool(tmp_path, max_bytes=1 << 30) as again:
        assert again.statistics().count == 250


def test_a_full_spool_drops_counts_and_logs_soon(tmp_path: Path) -> None:
    transport = Transport(up=False)
    with structlog.testing.capture_logs() as logs:
        p = spooled(tmp_path, transport, spool=Spool(tmp_path, max_bytes=64 * 1024))
        for s in spans(2000, prefix="x" * 200):
            p.submit(s)
        assert wait_until(lambda: p.stats().dropped.get(DropReason.SPOOL_FULL, 0) > 0)
        assert wait_until(lambda: any(e["event"] == "spans dropped" for e in logs))
    stats = p.stats()
    assert (
        stats.spooled + stats.dropped[DropReason.SPOOL_FULL] + stats.queue_depth + (stats.in_flight)
        == 2000 - stats.dropped[DropReason.QUEUE_FULL]
    )
    p.shutdown(1)


def test_spooled_records_are_rebuilt_and_sent(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 30) as spool:
        spool.put("records", b"3", 3, {"schema": "test"})

    def rebuild(item: SpoolItem) -> list[SpanData]:
        return spans(int(item.body), prefix="r")

    transport = Transport()
    p = spooled(tmp_path, transport, rebuild=rebuild)
    assert wait_until(lambda: p.stats().replayed == 3)
    assert sorted(transport.received) == ["r0", "r1", "r2"]
    p.shutdown(1)
    with Spool(tmp_path, max_bytes=1 << 30) as spool:
        assert spool.statistics().items == 0


def test_a_pipeline_that_does_not_replay_leaves_the_spool_alone(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 30) as spool:
        spool.put("otlp", orjson.dumps(["old"]), 1, {"content_type": "application/test"})
    transport = Transport()
    p = spooled(tmp_path, transport, replay=False)
    p.submit(make_span(0, name="new"))
    assert p.force_flush(5)
    p.shutdown(1)
    assert transport.received == ["new"]
    with Spool(tmp_path, max_bytes=1 << 30) as spool:
        assert spool.statistics().items == 1


def test_abandon_counts_what_is_left(tmp_path: Path) -> None:
    transport = Transport(up=False)
    p = spooled(tmp_path, transport, schedule_delay_s=60.0, max_export_batch_size=500)
    for s in spans(120):
        p.submit(s)
    assert p.abandon() == 120
    assert p.stats().dropped[DropReason.ABANDONED] == 120


def test_a_spool_needs_a_transport_that_can_keep_bodies(tmp_path: Path) -> None:
    class Plain:
        def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
            return SUCCESS

        def shutdown(self) -> None:
            pass

    with pytest.raises(ValueError, match="OTLP transport"):
        ExportPipeline(Plain(), spool=Spool(tmp_path, max_bytes=1 << 20))
    with pytest.raises(ValueError, match="two-stage"):
        ExportPipeline(Transport(), spool=Spool(tmp_path, max_bytes=1 << 20), encode_ahead=0)


def test_the_drop_reporter_logs_once_per_interval_and_sums_the_rest() -> None:
    totals = {"queue_full": 0}
    with structlog.testing.capture_logs() as logs:
        reporter = DropReporter("spans dropped", lambda: dict(totals), interval_s=0.3)
        totals["queue_full"] = 1
        reporter.poke()
        assert wait_until(lambda: len(logs) == 1)
        for _ in range(5):
            totals["queue_full"] += 1
            reporter.poke()
        assert wait_until(lambda: len(logs) == 2)
        reporter.close()
    assert [e["dropped"] for e in logs] == [{"queue_full": 1}, {"queue_full": 5}]
    assert logs[1]["total"] == {"queue_full": 6}


def test_a_full_buffer_is_logged_while_serving(tmp_path: Path) -> None:
    gate = threading.Event()

    class Stuck(Transport):
        def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
            gate.wait(10)
            return SUCCESS

    with structlog.testing.capture_logs() as logs:
        p = ExportPipeline(Stuck(), max_queue_size=10, max_export_batch_size=5)
        for s in spans(40):
            p.submit(s)
        assert wait_until(lambda: any(e["event"] == "spans dropped" for e in logs))
        gate.set()
        p.shutdown(5)
    [first, *_] = [e for e in logs if e["event"] == "spans dropped"]
    assert first["dropped"]["queue_full"] > 0
