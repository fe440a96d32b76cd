"""The two-stage worker (encoder thread → bounded hand-off → sender thread)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from export_helpers import QUIET, RETRY, FakeTimer, make_span, pipeline, wait_until

from zerver.export import (
    DropReason,
    ExportContext,
    ExportPipeline,
    ExportResult,
    ExportStatus,
    InMemoryExporter,
    OtlpHttpExporter,
    OtlpReceiver,
    Reply,
    ResilienceBuilder,
    RetryPolicy,
)
from zerver.export._base import SUCCESS, PreEncoder
from zerver.export._pipeline import find_pre_encoder
from zerver.export._spans import SpanData
from zerver.export._transport import EncodedBatch


class PreEncoding:
    """A transport double that encodes ahead; ``gate`` holds every send."""

    def __init__(self, *, gated: bool = False, jitter: bool = False) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self.jitter = jitter
        self.encoded: list[EncodedBatch] = []
        self.sent: list[SpanData] = []
        self.encode_threads: set[str] = set()
        self.send_threads: set[str] = set()
        self.fail_next_encode = False
        self.results: list[ExportResult] = []
        self.closed = False

    def encode_ahead(self, spans: Sequence[SpanData]) -> EncodedBatch:
        self.encode_threads.add(threading.current_thread().name)
        if self.fail_next_encode:
            self.fail_next_encode = False
            raise ValueError("encoder bug")
        if self.jitter:
            time.sleep(random.random() * 0.002)
        batch = EncodedBatch(spans, b"body", 0, self)
        self.encoded.append(batch)
        return batch

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        assert type(spans) is EncodedBatch and spans.encoded_by is self
        self.send_threads.add(threading.current_thread().name)
        self.entered.set()
        self.gate.wait(10)
        if self.jitter:
            time.sleep(random.random() * 0.002)
        if self.results:
            result = self.results.pop(0)
            if result.status is not ExportStatus.SUCCESS:
                return result
        self.sent.extend(spans)
        return SUCCESS

    def shutdown(self) -> None:
        self.closed = True
        self.gate.set()


def stages(exporter: object, **kwargs: object) -> ExportPipeline:
    return pipeline(exporter, **{"thread_name": "t-export", **kwargs})


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def test_two_stages_only_for_a_transport_that_encodes_ahead() -> None:
    transport = PreEncoding()
    assert isinstance(transport, PreEncoder)
    chain = ResilienceBuilder(transport).retry().circuit_breaker().rate_limit(spans_per_s=1e9)
    assert find_pre_encoder(chain.build()) is transport
    assert find_pre_encoder(InMemoryExporter()) is None

    p = stages(chain.build(), max_export_batch_size=2)
    for i in range(4):
        p.submit(make_span(i))
    assert p.shutdown(5).completed
    assert transport.encode_threads == {"t-export-encode"}
    assert transport.send_threads == {"t-export"}
    assert len(transport.sent) == 4

    single = stages(PreEncoding(), encode_ahead=0)
    assert single._encode_thread is None
    single.shutdown(5)
    memory = stages(InMemoryExporter())
    assert memory._encode_thread is None
    memory.shutdown(5)
    with pytest.raises(ValueError, match="encode_ahead"):
        ExportPipeline(InMemoryExporter(), encode_ahead=-1)


def test_order_is_preserved_across_the_hand_off() -> None:
    transport = PreEncoding(jitter=True)
    p = stages(transport, max_queue_size=2000, max_export_batch_size=7, encode_ahead=2)
    spans = [make_span(i, trace_id=i + 1) for i in range(700)]  # one trace each: no regrouping
    for s in spans:
        p.submit(s)
    report = p.shutdown(10)
    assert report.completed
    assert transport.sent == spans
    assert [s for b in transport.encoded for s in b] == spans
    st = report.stats
    assert (st.submitted, st.exported, st.dropped_total, st.in_flight) == (700, 700, 0, 0)
    assert st.batches_exported == 100


def test_hand_off_is_bounded_and_the_rest_waits_in_the_buffer() -> None:
    transport = PreEncoding(gated=True)
    p = stages(transport, max_queue_size=20, max_export_batch_size=5, encode_ahead=1)
    for i in range(5):
        p.submit(make_span(i))
    assert transport.entered.wait(5)  # batch 1 is being sent (held)
    for i in range(5, 10):
        p.submit(make_span(i))
    assert wait_until(lambda: len(transport.encoded) == 2)  # batch 2 waits in the hand-off
    for i in range(10, 40):
        p.submit(make_span(i))
    time.sleep(0.05)
    assert len(transport.encoded) == 2  # the encoder takes nothing more
    s = p.stats()
    assert (s.queue_depth, s.in_flight, s.dropped[DropReason.QUEUE_FULL]) == (20, 10, 10)
    assert s.submitted == 40 == s.exported + s.dropped_total + s.queue_depth + s.in_flight
    transport.gate.set()
    report = p.shutdown(5)
    assert report.completed
    st = report.stats
    assert (st.submitted, st.exported, st.dropped_total) == (40, 30, 10)
    assert [x.attributes for x in transport.sent] == [make_span(i).attributes for i in range(30)]


def test_shutdown_drains_buffer_and_hand_off_in_order() -> None:
    transport = PreEncoding(gated=True)
    p = stages(transport, max_queue_size=100, max_export_batch_size=10)
    spans = [make_span(i, trace_id=i + 1) for i in range(95)]
    for s in spans:
        p.submit(s)
    assert transport.entered.wait(5)
    threading.Timer(0.05, transport.gate.set).start()
    report = p.shutdown(5)
    assert report.completed and report.not_sent == 0
    assert transport.sent == spans
    assert transport.closed
    st = report.stats
    assert (st.exported, st.queue_depth, st.in_flight, st.batches_exported) == (95, 0, 0, 10)


def test_shutdown_deadline_counts_the_hand_off_as_not_sent() -> None:
    transport = PreEncoding()
    transport.results = [ExportResult(ExportStatus.DEFERRED, retry_after_s=3600)] * 1000
    p = stages(transport, max_queue_size=100, max_export_batch_size=10)
    for i in range(35):
        p.submit(make_span(i))
    report = p.shutdown(0.2)
    assert not report.completed
    assert report.not_sent == 35
    st = report.stats
    assert st.dropped[DropReason.SHUTDOWN_DEADLINE] == 35
    assert st.submitted == 35 == st.exported + st.dropped_total + st.queue_depth + st.in_flight


def test_force_flush_waits_for_the_batch_being_sent() -> None:
    transport = PreEncoding(gated=True)
    p = stages(transport)
    p.submit(make_span(0))
    assert not p.force_flush(0.05)
    transport.gate.set()
    assert p.force_flush(5)
    assert len(transport.sent) == 1
    p.submit(make_span(1))
    assert p.force_flush(5) and len(transport.sent) == 2
    p.shutdown(5)


def test_encoder_waits_instead_of_spinning_while_a_flush_waits_for_the_sender() -> None:
    calls = [0]

    class Counting(ExportPipeline):
        def _next_batch(self, next_due: float) -> list[SpanData] | None:  # type: ignore[override]
            calls[0] += 1
            return super()._next_batch(next_due)  # type: ignore[return-value]

    transport = PreEncoding(gated=True)
    p = Counting(transport, schedule_delay_s=QUIET)
    p.submit(make_span(0))
    assert not p.force_flush(0.2)  # the only span is held by the sender
    assert calls[0] < 10
    transport.gate.set()
    assert p.force_flush(5)
    assert p.shutdown(5).completed


def test_encoder_error_is_counted_and_both_stages_go_on() -> None:
    transport = PreEncoding()
    transport.fail_next_encode = True
    p = stages(transport, max_export_batch_size=3)
    for i in range(9):
        p.submit(make_span(i))
    st = p.shutdown(5).stats
    assert st.dropped[DropReason.EXPORTER_ERROR] == 3 and st.exported == 6
    assert st.submitted == st.exported + st.dropped_total


def test_retries_and_breaker_run_on_the_sender_with_the_encoded_body() -> None:
    transport = PreEncoding()
    transport.results = [RETRY, RETRY, SUCCESS]
    timer = FakeTimer()
    exporter = (
        ResilienceBuilder(transport)
        .retry(RetryPolicy(initial_backoff_s=0.5, jitter=0.0, max_attempts=2))
        .circuit_breaker(failures=1, cooldown_s=7.0, successes=1)
        .build()
    )
    p = stages(exporter, max_export_batch_size=1, timer=timer)
    for i in range(2):
        p.submit(make_span(i))
    st = p.shutdown(30).stats
    # batch 1: two attempts fail -> dropped, breaker opens; batch 2 waits 7 s, succeeds
    assert timer.sleeps == [pytest.approx(0.5), pytest.approx(7.0)]
    assert st.retries == 1 and st.breaker_openings == 1 and st.breaker_state == "closed"
    assert st.dropped[DropReason.EXPORT_FAILED] == 1 and st.exported == 1
    assert len(transport.encoded) == 2  # encoded once each, retried with the same body


def test_otlp_transport_sends_the_body_encoded_ahead(receiver: OtlpReceiver) -> None:
    transport = OtlpHttpExporter(receiver.endpoint, timeout_s=2.0)
    encodes: list[str] = []
    real_encode = transport._encode

    def counting(spans: Sequence[SpanData], *, ahead: bool = False) -> tuple[bytes, int]:
        encodes.append(threading.current_thread().name)
        return real_encode(spans, ahead=ahead)

    transport._encode = counting  # type: ignore[method-assign]
    receiver.responder = lambda req: None if req.index else Reply(503)
    exporter = (
        ResilienceBuilder(transport)
        .retry(RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.01, jitter=0.0))
        .build()
    )
    p = stages(exporter, max_export_batch_size=50, thread_name="otlp")
    for i in range(120):
        p.submit(make_span(i))
    report = p.shutdown(10)
    assert report.completed
    assert receiver.span_count == 120
    assert len(receiver.requests) == 4  # one 503, then three batches
    assert encodes == ["otlp-encode"] * 3  # the retry reused the encoded body
    assert report.stats.retries == 1 and report.stats.exported == 120
    # a foreign EncodedBatch is not trusted: the transport encodes it itself
    other = EncodedBatch([make_span(0)], b"not json", 0, object())
    assert transport.export(other, ExportContext.with_timeout(2)).ok
    transport.shutdown()
