"""Exporters that need no network: no-op and fan-out, and the former names of the
console and in-memory sinks (now :mod:`zerver._sinks`, one of each)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TextIO

from zerver._sinks import ConsoleSpanSink, _SpanStore, format_span
from zerver._spans import SpanData
from zerver.export._base import SUCCESS, BatchExporter, ExportContext, ExportResult

__all__ = [
    "ConsoleExporter",
    "FanOutExporter",
    "InMemoryExporter",
    "NoopExporter",
    "format_span",
]


class InMemoryExporter(_SpanStore):
    """Deprecated: :class:`zerver.InMemorySpanSink`, the one in-memory span sink, under its
    former exporter name (unbounded by default, ``ctx`` required, as it was)."""

    def __init__(self, maxlen: int | None = None) -> None:
        super().__init__(maxlen)

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        return self._keep(spans)


def ConsoleExporter(stream: TextIO | None = None) -> ConsoleSpanSink:  # noqa: N802 -- the old class's name
    """Deprecated: ``ConsoleSpanSink(stream, layout="lines")``, the one console span sink
    writing one line per span (to ``sys.stdout`` by default)."""
    return ConsoleSpanSink(stream, layout="lines")


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
