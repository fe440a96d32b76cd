from __future__ import annotations

import io
import threading
import types

import pytest
from export_helpers import (
    PERMANENT,
    RETRY,
    FakeTimer,
    Gated,
    Scripted,
    make_span,
    pipeline,
    wait_until,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

import zerver.export as export_api
from zerver.export import (
    ConsoleExporter,
    DropReason,
    ExportConfig,
    ExportContext,
    ExportPipeline,
    ExportResult,
    ExportStatus,
    FanOutExporter,
    InMemoryExporter,
    NoopExporter,
    Overflow,
    ResilienceBuilder,
    ZerverSpanExporter,
    ZerverSpanProcessor,
    span_to_readable,
)
from zerver.export._spans import SpanData


def full_blocking_pipeline(size: int, block_timeout_s: float) -> tuple[Gated, ExportPipeline]:
    """An ``Overflow.BLOCK`` pipeline whose worker holds a batch of ``size`` spans at
    the gate and whose buffer holds ``size`` more: the next submit has to wait."""
    gated = Gated()
    p = pipeline(
        gated,
        max_queue_size=size,
        max_export_batch_size=size,
        overflow=Overflow.BLOCK,
        block_timeout_s=block_timeout_s,
    )
    for i in range(size):
        p.submit(make_span(i))
    assert gated.entered.wait(5)  # the full queue woke the worker; it holds ``size``
    for i in range(size, 2 * size):
        p.submit(make_span(i))
    return gated, p


def test_all_is_exported_and_traces_stay_together() -> None:
    memory = InMemoryExporter()
    p = pipeline(memory, max_export_batch_size=100)
    a = [make_span(i, trace_id=0xA, span_id=i + 1) for i in range(3)]
    b = [make_span(i, trace_id=0xB, span_id=i + 10) for i in range(3)]
    for x, y in zip(a, b, strict=True):
        p.submit(x)
        p.submit(y)
    assert p.force_flush(5)
    assert memory.spans == [*a, *b]
    report = p.shutdown(5)
    assert report.completed and report.not_sent == 0
    assert memory.closed
    s = report.stats
    assert (s.submitted, s.exported, s.dropped_total, s.queue_depth, s.in_flight) == (6, 6, 0, 0, 0)
    assert s.batches_exported == 1 and s.breaker_state == "disabled"


def test_full_batch_exports_without_waiting_for_the_delay() -> None:
    memory = InMemoryExporter()
    p = pipeline(memory, max_export_batch_size=10)
    try:
        for i in range(25):
            p.submit(make_span(i))
        assert wait_until(lambda: len(memory.spans) == 20)
        assert memory.batches == 2
        assert p.stats().queue_depth == 5
    finally:
        p.shutdown(5)
    assert len(memory.spans) == 25


def test_schedule_delay_exports_a_partial_batch() -> None:
    exported = threading.Event()

    class Signal(InMemoryExporter):
        def export(self, spans, ctx):  # type: ignore[no-untyped-def]
            exported.set()
            return super().export(spans, ctx)

    memory = Signal()
    p = ExportPipeline(memory, schedule_delay_s=0.05)
    try:
        p.submit(make_span(0))
        assert exported.wait(5)
    finally:
        p.shutdown(5)
    assert len(memory.spans) == 1


def test_zero_delay_exports_each_span_promptly() -> None:
    memory = InMemoryExporter()
    p = ExportPipeline(memory, schedule_delay_s=0)
    try:
        p.submit(make_span(0))
        assert wait_until(lambda: len(memory.spans) == 1)
    finally:
        p.shutdown(5)


def test_drop_newest_counts_exactly() -> None:
    gated = Gated()
    p = pipeline(gated, max_queue_size=10, max_export_batch_size=5)
    for i in range(5):
        p.submit(make_span(i))
    p.force_flush(0)  # start the first batch; the gate holds it
    assert gated.entered.wait(5)
    for i in range(5, 30):
        p.submit(make_span(i))
    s = p.stats()
    assert s.dropped[DropReason.QUEUE_FULL] == 15
    assert (s.queue_depth, s.in_flight, s.submitted) == (10, 5, 30)
    gated.gate.set()
    report = p.shutdown(5)
    assert report.completed
    assert len(gated.spans) == 15
    assert report.stats.exported + report.stats.dropped_total == 30


def test_drop_oldest_keeps_the_newest() -> None:
    gated = Gated()
    p = pipeline(gated, max_queue_size=10, max_export_batch_size=5, overflow=Overflow.DROP_OLDEST)
    spans = [make_span(i) for i in range(30)]
    for s in spans[:5]:
        p.submit(s)
    p.force_flush(0)
    assert gated.entered.wait(5)
    for s in spans[5:]:
        p.submit(s)
    assert p.stats().dropped[DropReason.EVICTED] == 15
    gated.gate.set()
    report = p.shutdown(5)
    assert gated.spans == spans[:5] + spans[20:]
    assert report.stats.submitted == 30


def test_block_waits_for_room_then_times_out() -> None:
    gated, p = full_blocking_pipeline(4, block_timeout_s=5.0)
    done = threading.Event()

    def producer() -> None:
        p.submit(make_span(8))  # blocks: queue full, worker gated
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.05)
    gated.gate.set()
    assert done.wait(5)
    t.join(5)
    report = p.shutdown(5)
    assert len(gated.spans) == 9 and report.stats.dropped_total == 0

    gated2, p2 = full_blocking_pipeline(2, block_timeout_s=0.02)
    p2.submit(make_span(9))
    assert p2.stats().dropped[DropReason.BLOCK_TIMEOUT] == 1
    gated2.gate.set()
    p2.shutdown(5)


def test_blocked_producer_is_released_by_shutdown() -> None:
    gated, p = full_blocking_pipeline(2, block_timeout_s=30)
    t = threading.Thread(target=p.submit, args=(make_span(5),))
    t.start()
    assert wait_until(lambda: p._blocked == 1)
    gated.gate.set()
    p.shutdown(5)
    t.join(5)
    assert not t.is_alive()


def test_submit_after_shutdown_is_counted_closed() -> None:
    for overflow in Overflow:
        p = pipeline(InMemoryExporter(), overflow=overflow)
        p.shutdown(1)
        p.submit(make_span(0))
        assert p.stats().dropped[DropReason.CLOSED] == 1
        assert p.shutdown(1).completed  # idempotent


def test_outcomes_are_counted_by_reason() -> None:
    results = [
        ExportResult(ExportStatus.SUCCESS, rejected_spans=2, invalid_spans=1, bytes_sent=10),
        PERMANENT,
        RETRY,
    ]
    p = pipeline(Scripted(*results, ExportResult(ExportStatus.SUCCESS)), max_export_batch_size=5)
    for i in range(15):
        p.submit(make_span(i))
    s = p.shutdown(5).stats
    assert s.exported == 2
    assert s.dropped[DropReason.PARTIAL_REJECTED] == 2 and s.partial_rejections == 2
    assert s.dropped["invalid"] == 1
    assert s.dropped[DropReason.REJECTED] == 5 and s.permanent_failures == 1
    assert s.dropped[DropReason.EXPORT_FAILED] == 5 and s.batches_failed == 1
    assert s.bytes_sent == 10
    assert s.submitted == s.exported + s.dropped_total


def test_exporter_exception_is_counted_and_the_worker_survives() -> None:
    class Boom(InMemoryExporter):
        def export(self, spans, ctx):  # type: ignore[no-untyped-def]
            if not self.batches and not getattr(self, "raised", False):
                self.raised = True
                raise RuntimeError("bug")
            return super().export(spans, ctx)

    boom = Boom()
    p = pipeline(boom, max_export_batch_size=2)
    for i in range(4):
        p.submit(make_span(i))
    s = p.shutdown(5).stats
    assert s.dropped[DropReason.EXPORTER_ERROR] == 2 and s.exported == 2


def test_submit_never_raises_on_garbage() -> None:
    memory = InMemoryExporter()
    p = pipeline(memory)
    p.submit(object())  # type: ignore[arg-type]
    p.submit(make_span(0))
    s = p.shutdown(5).stats
    assert s.dropped["invalid"] == 1 and s.exported == 1


def test_deferred_batches_wait_and_shutdown_reports_what_was_not_sent() -> None:
    forever = Scripted(ExportResult(ExportStatus.DEFERRED, retry_after_s=3600))
    p = pipeline(forever, max_queue_size=100, max_export_batch_size=10)
    for i in range(35):
        p.submit(make_span(i))
    report = p.shutdown(0.2)
    assert not report.completed
    assert report.not_sent == 35
    assert report.stats.dropped[DropReason.SHUTDOWN_DEADLINE] == 35
    assert forever.closed


def test_breaker_deferral_with_virtual_time() -> None:
    timer = FakeTimer()
    inner = Scripted(RETRY, RETRY, ExportResult(ExportStatus.SUCCESS))
    exporter = (
        ResilienceBuilder(inner).circuit_breaker(failures=1, cooldown_s=7.0, successes=1).build()
    )
    p = pipeline(exporter, max_export_batch_size=1, timer=timer)
    for i in range(3):
        p.submit(make_span(i))
    s = p.shutdown(30).stats
    # batch 1 fails and opens the breaker; batch 2 waits 7 s (virtual), probes, fails,
    # re-opens; batch 3 waits again and succeeds.
    assert timer.sleeps == [pytest.approx(7.0), pytest.approx(7.0)]
    assert s.breaker_openings == 2 and s.breaker_state == "closed"
    assert s.dropped[DropReason.EXPORT_FAILED] == 2 and s.exported == 1


def test_force_flush_times_out_while_the_exporter_hangs() -> None:
    gated = Gated()
    p = pipeline(gated)
    p.submit(make_span(0))
    assert not p.force_flush(0.05)
    gated.gate.set()
    assert p.force_flush(5)
    p.shutdown(5)


def test_async_wrappers() -> None:
    import anyio

    memory = InMemoryExporter()
    p = pipeline(memory)

    async def main() -> None:
        p.submit(make_span(0))
        assert await p.aflush(5)
        report = await p.ashutdown(5)
        assert report.completed

    anyio.run(main)
    assert len(memory.spans) == 1


def test_context_manager_shuts_down() -> None:
    memory = InMemoryExporter()
    with pipeline(memory) as p:
        p.submit(make_span(0))
    assert len(memory.spans) == 1 and memory.closed


def test_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        ExportPipeline(NoopExporter(), max_queue_size=10, max_export_batch_size=11)
    with pytest.raises(ValueError):
        ExportPipeline(NoopExporter(), max_queue_size=0)
    with pytest.raises(ValueError):
        ExportPipeline(NoopExporter(), export_timeout_s=0)


# -- OpenTelemetry SDK adapters ---------------------------------------------------


def test_span_processor_sends_sdk_spans_through_the_pipeline() -> None:
    memory = InMemoryExporter()
    p = pipeline(memory)
    provider = TracerProvider()
    provider.add_span_processor(ZerverSpanProcessor(p))
    tracer = provider.get_tracer("user.code", "1.2")
    with (
        tracer.start_as_current_span("outer", attributes={"k": "v"}),
        tracer.start_as_current_span("inner") as inner,
    ):
        inner.add_event("hello", {"n": 1})
    assert provider.force_flush(5000)
    names = {s.name: s for s in memory.spans}
    assert set(names) == {"outer", "inner"}
    assert names["inner"].parent_span_id == names["outer"].span_id
    assert names["inner"].scope.name == "user.code" and names["inner"].scope.version == "1.2"
    assert names["outer"].attributes == {"k": "v"}
    assert names["inner"].events[0][0] == "hello"
    # sampled, "parent is-remote known", parent not remote (0x02 = W3C random may be set)
    assert names["inner"].flags & 0x301 == 0x101
    provider.shutdown()
    assert memory.closed


def test_span_exporter_adapter() -> None:
    memory = InMemoryExporter()
    adapter = ZerverSpanExporter(memory)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(adapter))
    with provider.get_tracer("t").start_as_current_span("work"):
        pass
    assert [s.name for s in memory.spans] == ["work"]
    assert adapter.export([span_to_readable(make_span(0))]) is SpanExportResult.SUCCESS
    failing = ZerverSpanExporter(Scripted(PERMANENT))
    assert failing.export([span_to_readable(make_span(0))]) is SpanExportResult.FAILURE
    assert adapter.force_flush()
    provider.shutdown()
    assert memory.closed


# -- small exporters, factory, public surface ---------------------------------------


def test_console_exporter_writes_readable_lines() -> None:
    out = io.StringIO()
    span = make_span(0, status_code=2, status_message="boom")
    result = ConsoleExporter(out).export([span], ExportContext.with_timeout(1))
    assert result.ok
    line = out.getvalue()
    assert line.startswith("CLIENT   db.get blog_post  0.250 ms  trace=")
    assert "status=ERROR(boom)" in line and "http.request.method='GET'" in line
    assert "[event zerver.job.enqueued]" in line


def test_fan_out_reports_the_primary_and_ignores_side_channel_errors() -> None:
    class Broken(NoopExporter):
        def export(self, spans, ctx):  # type: ignore[no-untyped-def]
            raise OSError("closed stdout")

    memory = InMemoryExporter()
    fan = FanOutExporter(memory, Broken())
    assert fan.export([make_span(0)], ExportContext.with_timeout(1)).ok
    assert len(memory.spans) == 1
    fan.shutdown()
    assert memory.closed


def test_from_config_builds_the_configured_exporters(capsys: pytest.CaptureFixture[str]) -> None:
    p = ExportPipeline.from_config(ExportConfig.from_env({"OTEL_TRACES_EXPORTER": "console"}))
    p.submit(make_span(0))
    p.shutdown(5)
    assert "db.get blog_post" in capsys.readouterr().out
    none = ExportPipeline.from_config(ExportConfig.from_env({"OTEL_TRACES_EXPORTER": "none"}))
    assert isinstance(none._exporter, NoopExporter)
    none.shutdown(1)
    both = export_api.build_exporter(
        ExportConfig.from_env({"OTEL_TRACES_EXPORTER": "otlp,console"})
    )
    assert isinstance(both, FanOutExporter)
    both.shutdown()
    otlp = ExportPipeline.from_config(ExportConfig())
    assert otlp.stats().breaker_state == "closed"
    otlp.shutdown(1)


def test_public_surface_matches_all() -> None:
    # Modules are left out: pytest's assertion rewriting may add its own (``@py_builtins``).
    public = {
        n
        for n, v in vars(export_api).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
    assert set(export_api.__all__) == public
    assert export_api.__all__ == sorted(export_api.__all__, key=str)
    for name in export_api.__all__:
        assert getattr(export_api, name) is not None
    assert isinstance(make_span(0), SpanData)
