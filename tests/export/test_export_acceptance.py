"""End-to-end acceptance: the pipeline against a real OTLP/HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from export_helpers import RES, SCOPE, T0, FakeTimer, wait_until

from zerver.export import (
    DropReason,
    ExportConfig,
    ExportPipeline,
    OtlpHttpExporter,
    OtlpReceiver,
    Overflow,
    ReceivedRequest,
    Reply,
    ResilienceBuilder,
    RetryPolicy,
)
from zerver.export._spans import SpanData, SpanKind


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def producer_span(producer: int, seq: int) -> SpanData:
    # Five consecutive spans share a trace, as a request's spans do.
    return SpanData(
        name="op",
        trace_id=(producer + 1) << 64 | (seq // 5 + 1),
        span_id=(producer + 1) << 32 | (seq + 1),
        kind=SpanKind.INTERNAL,
        start_ns=T0 + seq,
        end_ns=T0 + seq + 1000,
        attributes={"producer": producer, "seq": seq},
        resource=RES,
        scope=SCOPE,
    )


def run_producers(pipeline: ExportPipeline, producers: int, per_producer: int) -> None:
    def produce(p: int) -> None:
        submit = pipeline.submit
        for seq in range(per_producer):
            submit(producer_span(p, seq))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)


def arrivals(receiver: OtlpReceiver) -> list[tuple[int, int]]:
    """(producer, seq) of every accepted span, in arrival order (cheap: no full decode)."""
    out = []
    for req in receiver.requests:
        if req.status != 200:
            continue
        for rs in req.decode()["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    producer, seq = span["attributes"]
                    out.append((int(producer["value"]["intValue"]), int(seq["value"]["intValue"])))
    return out


def resilient(endpoint: str, **retry: float) -> ResilienceBuilder:
    policy = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0, **retry)  # type: ignore[arg-type]
    return ResilienceBuilder(OtlpHttpExporter(endpoint, timeout_s=2.0)).retry(policy)


# -- no loss ------------------------------------------------------------------------


@pytest.mark.slow
def test_no_loss_16_producers_x_25000(receiver: OtlpReceiver) -> None:
    producers, per_producer = 16, 25_000
    total = producers * per_producer
    pipeline = ExportPipeline(
        resilient(receiver.endpoint).circuit_breaker().build(),
        max_queue_size=16_384,
        max_export_batch_size=4096,
        schedule_delay_s=0.05,
        overflow=Overflow.BLOCK,
        block_timeout_s=30.0,
    )
    run_producers(pipeline, producers, per_producer)
    report = pipeline.shutdown(30)
    assert report.completed, report
    s = report.stats
    assert (s.submitted, s.exported, s.dropped_total) == (total, total, 0)
    assert receiver.span_count == total
    seen = arrivals(receiver)
    assert len(seen) == total
    last = [-1] * producers
    for producer, seq in seen:
        assert seq == last[producer] + 1, f"producer {producer}: {seq} after {last[producer]}"
        last[producer] = seq
    assert last == [per_producer - 1] * producers


def test_protobuf_gzip_end_to_end(receiver: OtlpReceiver) -> None:
    cfg = ExportConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_BSP_SCHEDULE_DELAY": "10",
        }
    )
    pipeline = ExportPipeline.from_config(cfg)
    run_producers(pipeline, 2, 500)
    assert pipeline.shutdown(10).completed
    assert receiver.span_count == 1000
    assert {r.content_encoding for r in receiver.requests} == {"gzip"}
    assert receiver.spans()[0]["attributes"][0]["key"] == "producer"


# -- backpressure ---------------------------------------------------------------------


def slow_pipeline(receiver: OtlpReceiver, overflow: Overflow) -> ExportPipeline:
    receiver.delay_s = 0.01
    return ExportPipeline(
        resilient(receiver.endpoint).build(),
        max_queue_size=200,
        max_export_batch_size=50,
        schedule_delay_s=0.01,
        overflow=overflow,
        block_timeout_s=20.0,
    )


def test_backpressure_block_delivers_everything(receiver: OtlpReceiver) -> None:
    pipeline = slow_pipeline(receiver, Overflow.BLOCK)
    run_producers(pipeline, 4, 1000)
    report = pipeline.shutdown(20)
    assert report.completed
    assert receiver.span_count == 4000
    assert report.stats.exported == 4000 and report.stats.dropped_total == 0


def test_backpressure_drop_newest_counts_exactly_what_is_missing(receiver: OtlpReceiver) -> None:
    pipeline = slow_pipeline(receiver, Overflow.DROP_NEWEST)
    run_producers(pipeline, 4, 1000)
    report = pipeline.shutdown(20)
    s = report.stats
    assert report.completed
    assert s.dropped[DropReason.QUEUE_FULL] > 0
    assert s.dropped_total == s.dropped[DropReason.QUEUE_FULL]
    assert receiver.span_count == s.exported == 4000 - s.dropped[DropReason.QUEUE_FULL]
    got = set(arrivals(receiver))
    assert len(got) == receiver.span_count  # no duplicates either


# -- faults ---------------------------------------------------------------------------


def test_503_retry_after_is_honoured_and_nothing_is_lost(receiver: OtlpReceiver) -> None:
    receiver.responder = lambda req: (
        Reply(503, headers=(("Retry-After", "1"),)) if req.index < 3 else None
    )
    timer = FakeTimer()
    pipeline = ExportPipeline(
        resilient(receiver.endpoint).build(),
        max_export_batch_size=100,
        schedule_delay_s=60,
        timer=timer,
    )
    run_producers(pipeline, 1, 250)
    s = pipeline.shutdown(30).stats
    assert timer.sleeps == [1.0, 1.0, 1.0]
    assert s.retries == 3 and s.exported == 250 and s.dropped_total == 0
    assert receiver.span_count == 250
    assert len(receiver.requests) == 6  # 3 refusals of the first batch, then 3 batches


def test_503_retry_after_real_wait(receiver: OtlpReceiver) -> None:
    receiver.responder = lambda req: (
        Reply(503, headers=(("Retry-After", "1"),)) if req.index == 0 else None
    )
    pipeline = ExportPipeline(resilient(receiver.endpoint).build(), schedule_delay_s=60)
    run_producers(pipeline, 1, 10)
    assert pipeline.shutdown(10).completed
    first, second = receiver.requests
    assert second.received_at - first.received_at >= 1.0
    assert receiver.span_count == 10


def test_400_is_dropped_counted_and_not_retried(receiver: OtlpReceiver) -> None:
    receiver.responder = lambda req: Reply(400, body=b"bad request")
    pipeline = ExportPipeline(
        resilient(receiver.endpoint).circuit_breaker(failures=1).build(),
        max_export_batch_size=10,
        schedule_delay_s=60,
    )
    run_producers(pipeline, 1, 30)
    s = pipeline.shutdown(10).stats
    assert len(receiver.requests) == 3
    assert s.dropped[DropReason.REJECTED] == 30 and s.permanent_failures == 3
    assert s.retries == 0 and s.exported == 0 and s.breaker_state == "closed"


def test_breaker_opens_and_half_opens_as_configured(receiver: OtlpReceiver) -> None:
    receiver.responder = lambda req: Reply(503) if req.index < 6 else None
    timer = FakeTimer()
    exporter = (
        resilient(receiver.endpoint, max_attempts=2)
        .circuit_breaker(failures=2, cooldown_s=5.0, successes=2)
        .build()
    )
    pipeline = ExportPipeline(exporter, max_export_batch_size=10, schedule_delay_s=60, timer=timer)
    run_producers(pipeline, 1, 50)
    s = pipeline.shutdown(60).stats
    # b1: 2 failed attempts; b2: 2 more -> open; b3 waits 5 s, probes twice, fails -> open;
    # b4 waits 5 s, probe succeeds (half-open); b5 succeeds -> closed.
    assert timer.sleeps == pytest.approx([0.01, 0.01, 5.0, 0.01, 5.0])
    assert s.breaker_openings == 2 and s.breaker_state == "closed"
    assert s.dropped[DropReason.EXPORT_FAILED] == 30 and s.exported == 20
    assert len(receiver.requests) == 8


def test_receiver_down_bounded_memory_counters_rise_then_recovery() -> None:
    receiver = OtlpReceiver().start()
    receiver.stop()  # down; its port is kept for the restart
    exporter = (
        resilient(receiver.endpoint)
        .circuit_breaker(failures=2, cooldown_s=0.1, successes=1)
        .build()
    )
    pipeline = ExportPipeline(
        exporter,
        max_queue_size=100,
        max_export_batch_size=10,
        schedule_delay_s=0.005,
        export_timeout_s=0.05,
    )
    try:
        for seq in range(2000):
            pipeline.submit(producer_span(0, seq))
            assert pipeline.stats().queue_depth <= 100
        assert wait_until(lambda: pipeline.stats().breaker_openings >= 1)
        down = pipeline.stats()
        assert down.dropped[DropReason.QUEUE_FULL] > 0
        assert down.dropped[DropReason.EXPORT_FAILED] > 0
        assert down.exported == 0

        receiver.start()
        # Recovery: the buffered spans go out once the half-open probe succeeds.
        assert wait_until(lambda: pipeline.stats().queue_depth == 0 and receiver.span_count > 0)
        assert pipeline.stats().breaker_state == "closed"
        for seq in range(2000, 2050):
            pipeline.submit(producer_span(0, seq))
        assert pipeline.force_flush(10)
        report = pipeline.shutdown(10)
        s = report.stats
        assert report.completed
        assert s.submitted == 2050 == s.exported + s.dropped_total
        assert receiver.span_count == s.exported
        assert (0, 2049) in set(arrivals(receiver))
    finally:
        pipeline.shutdown(1)
        receiver.stop()


# -- shutdown ---------------------------------------------------------------------------


def test_shutdown_drains_spans_in_flight_within_the_deadline(receiver: OtlpReceiver) -> None:
    receiver.delay_s = 0.005
    pipeline = ExportPipeline(
        resilient(receiver.endpoint).build(),
        max_queue_size=5000,
        max_export_batch_size=250,
        schedule_delay_s=60,
    )
    run_producers(pipeline, 1, 5000)
    assert pipeline.stats().queue_depth + pipeline.stats().in_flight > 0
    started = time.monotonic()
    report = pipeline.shutdown(10)
    assert time.monotonic() - started < 10
    assert report.completed and report.not_sent == 0
    assert receiver.span_count == 5000


def test_shutdown_deadline_reports_what_could_not_be_sent(receiver: OtlpReceiver) -> None:
    gate = threading.Event()

    def hold(req: ReceivedRequest) -> Reply | None:
        gate.wait(5)
        return None

    receiver.responder = hold
    pipeline = ExportPipeline(
        resilient(receiver.endpoint).build(),
        max_queue_size=1000,
        max_export_batch_size=100,
        schedule_delay_s=60,
    )
    try:
        run_producers(pipeline, 1, 1000)
        report = pipeline.shutdown(0.3)
    finally:
        gate.set()
    s = report.stats
    assert not report.completed
    assert report.not_sent >= 900
    assert s.submitted == s.exported + s.dropped_total + s.queue_depth + s.in_flight
