from __future__ import annotations

import email.utils
import gzip
import http.client
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson
import pytest
import structlog
from export_helpers import export_once, make_span
from opentelemetry import context as otel_context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from zerver.export import (
    ExportConfig,
    ExportContext,
    ExportStatus,
    JsonEncoder,
    OtlpHttpExporter,
    OtlpReceiver,
    ReceivedRequest,
    Reply,
    parse_partial_success,
    parse_retry_after,
)
from zerver.export._spans import SpanData

BATCH = [make_span(i) for i in range(5)]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def send(exporter: OtlpHttpExporter, timeout: float = 5.0) -> Any:
    return exporter.export(BATCH, ExportContext.with_timeout(timeout))


# -- parsing ------------------------------------------------------------------------


def test_retry_after_seconds_and_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 120 ") == 120.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=lambda: now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now=lambda: now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None


def test_partial_success_json_and_protobuf() -> None:
    assert parse_partial_success(b"", "application/json") == (0, "")
    assert parse_partial_success(b"{}", "application/json") == (0, "")
    body = b'{"partialSuccess":{"rejectedSpans":"3","errorMessage":"too old"}}'
    assert parse_partial_success(body, "application/json") == (3, "too old")
    assert parse_partial_success(b'{"partialSuccess":{"rejectedSpans":2}}', "application/json") == (
        2,
        "",
    )
    pb = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=4, error_message="bad")
    ).SerializeToString()
    assert parse_partial_success(pb, "application/x-protobuf") == (4, "bad")
    assert parse_partial_success(b"<html>", "text/html") == (0, "")
    assert parse_partial_success(b"[1]", "application/json") == (0, "")


# -- against a real receiver ----------------------------------------------------------


def test_json_post_with_headers(receiver: OtlpReceiver) -> None:
    exporter = OtlpHttpExporter(receiver.endpoint, headers={"api-key": "s=cret"})
    result = export_once(exporter, BATCH)
    assert result.ok and result.bytes_sent > 0
    (req,) = receiver.requests
    assert req.content_type == "application/json"
    assert req.headers["api-key"] == "s=cret"
    assert req.headers["User-Agent"].startswith("zerver-otlp-exporter/")
    assert receiver.span_count == 5
    assert [s["name"] for s in req.spans()] == ["db.get blog_post"] * 5


def test_protobuf_and_gzip_from_config(receiver: OtlpReceiver) -> None:
    cfg = ExportConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a%20b",
        }
    )
    exporter = OtlpHttpExporter.from_config(cfg)
    assert export_once(exporter, BATCH).ok
    (req,) = receiver.requests
    assert req.content_type == "application/x-protobuf"
    assert req.content_encoding == "gzip"
    assert req.headers["x-tenant"] == "a b"
    assert req.span_count == 5
    assert req.spans()[0]["traceId"] == f"{BATCH[0].trace_id:032x}"


def test_partial_success_is_counted_and_logged(receiver: OtlpReceiver) -> None:
    receiver.responder = lambda req: Reply(
        200, body=b'{"partialSuccess":{"rejectedSpans":"2","errorMessage":"too big"}}'
    )
    exporter = OtlpHttpExporter(receiver.endpoint)
    try:
        with structlog.testing.capture_logs() as logs:
            first = send(exporter)
            second = send(exporter)
    finally:
        exporter.shutdown()
    assert first.ok and first.rejected_spans == 2 and second.rejected_spans == 2
    partial = [e for e in logs if e["event"] == "otlp export partially rejected"]
    assert len(partial) == 1  # rate-limited: the second is suppressed
    assert partial[0]["rejected_spans"] == 2 and partial[0]["error_message"] == "too big"


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_carry_retry_after(receiver: OtlpReceiver, status: int) -> None:
    receiver.responder = lambda req: Reply(status, headers=(("Retry-After", "7"),))
    exporter = OtlpHttpExporter(receiver.endpoint)
    result = export_once(exporter, BATCH)
    assert result.status is ExportStatus.RETRYABLE
    assert result.retry_after_s == 7.0


@pytest.mark.parametrize("status", [400, 401, 404, 413, 500])
def test_other_statuses_are_permanent(receiver: OtlpReceiver, status: int) -> None:
    receiver.responder = lambda req: Reply(status, body=b"nope")
    exporter = OtlpHttpExporter(receiver.endpoint)
    try:
        with structlog.testing.capture_logs() as logs:
            result = send(exporter)
    finally:
        exporter.shutdown()
    assert result.status is ExportStatus.PERMANENT
    assert f"HTTP {status}" in result.detail
    assert logs and logs[0]["status"] == status


def test_connection_refused_is_retryable() -> None:
    receiver = OtlpReceiver().start()
    endpoint = receiver.endpoint
    receiver.stop()
    exporter = OtlpHttpExporter(endpoint, timeout_s=1.0)
    result = export_once(exporter, BATCH)
    assert result.status is ExportStatus.RETRYABLE
    assert "connection error" in result.detail


def test_passed_deadline_does_not_send(receiver: OtlpReceiver) -> None:
    exporter = OtlpHttpExporter(receiver.endpoint)
    result = export_once(exporter, BATCH, timeout=0.0)
    assert result.status is ExportStatus.RETRYABLE
    assert receiver.requests == []


def test_reconnects_when_the_server_closed_the_idle_connection(receiver: OtlpReceiver) -> None:
    exporter = OtlpHttpExporter(receiver.endpoint)
    try:
        assert send(exporter).ok
        receiver.stop()  # closes the kept-alive connection
        receiver.start()
        assert send(exporter).ok
    finally:
        exporter.shutdown()
    assert receiver.span_count == 10


def test_retried_batch_is_encoded_once(receiver: OtlpReceiver) -> None:
    answers = iter([Reply(503), Reply(200)])
    receiver.responder = lambda req: next(answers)
    calls = []

    class Counting(JsonEncoder):
        __slots__ = ()

        def encode(
            self, spans: Sequence[SpanData], pause: Callable[[], object] | None = None
        ) -> bytes:
            calls.append(1)
            return super().encode(spans, pause)

    exporter = OtlpHttpExporter(receiver.endpoint, compression="gzip", encoder=Counting())
    try:
        c = ExportContext.with_timeout(5)
        assert exporter.export(BATCH, c).status is ExportStatus.RETRYABLE
        assert exporter.export(BATCH, c).ok
    finally:
        exporter.shutdown()
    assert calls == [1]
    assert receiver.requests[0].body == receiver.requests[1].body
    assert orjson.loads(gzip.decompress(gzip.compress(receiver.requests[0].body)))


def test_requests_run_with_instrumentation_suppressed(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []
    real = http.client.HTTPConnection.request

    def spy(self: http.client.HTTPConnection, *args: Any, **kwargs: Any) -> None:
        seen.append(otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY))
        real(self, *args, **kwargs)

    monkeypatch.setattr(http.client.HTTPConnection, "request", spy)
    exporter = OtlpHttpExporter(receiver.endpoint)
    assert export_once(exporter, BATCH).ok
    assert seen == [True]
    assert otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY) is None


def test_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="not an http"):
        OtlpHttpExporter("localhost:4318")
    with pytest.raises(ValueError, match="compression"):
        OtlpHttpExporter("http://x", compression="br")
    with pytest.raises(ValueError, match="protocol"):
        OtlpHttpExporter("http://x", protocol="grpc")


def test_receiver_answers_404_and_400(receiver: OtlpReceiver) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    try:
        conn.request("POST", "/other", b"{}", {"Content-Type": "application/json"})
        assert conn.getresponse().read() and True
        conn.request("POST", "/v1/traces", b"{not json", {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 400
    finally:
        conn.close()
    statuses = [r.status for r in receiver.requests]
    assert statuses == [404, 400]
    assert isinstance(receiver.requests[0], ReceivedRequest)
