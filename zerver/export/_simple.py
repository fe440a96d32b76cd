"""Exporters that need no network: console, in-memory (tests), no-op, fan-out."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from zerver._spans import KIND_NAMES, STATUS_NAMES, SpanData
from zerver.export._base import SUCCESS, BatchExporter, ExportContext, ExportResult, ExportStatus

__all__ = ["ConsoleExporter", "FanOutExporter", "InMemoryExporter", "NoopExporter"]


def format_span(s: SpanData) -> str:
    """One human-readable line: kind, name, duration, ids, status, attributes."""
    kind = KIND_NAMES.get(s.kind, str(s.kind))
    status = STATUS_NAMES.get(s.status_code, str(s.status_code))
    if s.status_message:
        status += f"({s.status_message})"
    parent = f"{s.parent_span_id:016x}" if s.parent_span_id else "-"
    attrs = " ".join(f"{k}={v!r}" for k, v in s.attributes.items())
    events = "".join(f" [event {e[0]}]" for e in s.events)
    return (
        f"{kind:<8} {s.name}  {(s.end_ns - s.start_ns) / 1e6:.3f} ms  "
        f"trace={s.trace_id:032x} span={s.span_id:016x} parent={parent} "
        f"status={status} {attrs}{events}".rstrip()
    )


class ConsoleExporter:
    """Writes one line per span to a text stream (stdout by default).

    For ``OTEL_TRACES_EXPORTER=console``: local development, no backend.
    """

    __slots__ = ("_lock", "_stream")

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        text = "".join(format_span(s) + "\n" for s in spans)
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError) as exc:
                return ExportResult(ExportStatus.PERMANENT, detail=f"console write failed: {exc!r}")
        return ExportResult(ExportStatus.SUCCESS, bytes_sent=len(text))

    def shutdown(self) -> None:
        return None


class InMemoryExporter:
    """Keeps exported spans in memory, for tests. Thread-safe.

    Example::

        memory = InMemoryExporter()
        pipeline = ExportPipeline(memory, schedule_delay_s=0)
        ...
        pipeline.force_flush()
        assert [s.name for s in memory.spans] == ["GET /"]
    """

    __slots__ = ("_batches", "_lock", "_spans", "closed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[SpanData] = []
        self._batches = 0
        self.closed = False

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        with self._lock:
            self._spans.extend(spans)
            self._batches += 1
        return SUCCESS

    @property
    def spans(self) -> list[SpanData]:
        """A copy of every span exported so far, in export order."""
        with self._lock:
            return list(self._spans)

    @property
    def batches(self) -> int:
        return self._batches

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._batches = 0

    def shutdown(self) -> None:
        self.closed = True


class NoopExporter:
    """Accepts and discards everything (``OTEL_TRACES_EXPORTER=none``)."""

    __slots__ = ()

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        return SUCCESS

    def shutdown(self) -> None:
        return None


class FanOutExporter:
    """Sends each batch to several exporters; the first one's result is reported.

    Used for ``OTEL_TRACES_EXPORTER=otlp,console``: the console copy is a side
    channel and must not change what the counters say about the backend.
    """

    __slots__ = ("_others", "_primary")

    def __init__(self, primary: BatchExporter, *others: BatchExporter) -> None:
        self._primary = primary
        self._others = others

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        for other in self._others:
            with contextlib.suppress(Exception):  # a side channel never fails the batch
                other.export(spans, ctx)
        return self._primary.export(spans, ctx)

    def shutdown(self) -> None:
        for exporter in (self._primary, *self._others):
            exporter.shutdown()
