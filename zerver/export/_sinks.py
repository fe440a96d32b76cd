"""The span sinks for development and tests: one in-memory collector, one console writer.

Each serves both places spans go: the trace engine's sink (``export(spans)``,
one request's spans on the event loop) and an exporter layer of
``zerver.export`` (``export(spans, ctx) -> ExportResult`` plus ``shutdown()``,
on the pipeline's thread). The OTLP exporter (``zerver.export``) is the
production sink. ``zerver.export.InMemoryExporter`` and ``ConsoleExporter``
are the former names, kept as deprecated aliases.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

import structlog

from ._spans import KIND_NAMES, STATUS_NAMES, AttrValue, SpanData, StatusCode, span_tree

if TYPE_CHECKING:
    from ._base import ExportContext, ExportResult
    from ._pipeline import ExportPipeline

__all__ = [
    "ConsoleSpanSink",
    "InMemorySpanSink",
    "PipelineSink",
    "SpanSink",
    "format_span",
    "format_trace",
    "traces_text",
    "write_text",
]

_log = structlog.get_logger("zerver.export")


class SpanSink(Protocol):
    """Where finished spans go: the one span-sink protocol.

    The trace engine calls ``export`` with one request's spans, on the event
    loop, so a sink it feeds must be cheap and must not block (hand the spans
    to an export pipeline, keep them in memory). Whatever ``export`` returns
    is ignored there; the sinks below also return an ``ExportResult`` and take
    an optional ``ctx``, so an export pipeline can use them as its exporter.
    """

    def export(self, spans: list[SpanData]) -> object: ...


def write_text(stream: TextIO, lock: threading.Lock, text: str) -> ExportResult:
    """Write and flush ``text`` under ``lock``; a failed write is a ``PERMANENT``
    result naming the error, never an exception (the consoles' one write)."""
    with lock:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError) as exc:
            return _result(False, detail=f"console write failed: {exc!r}")
    return _result(bytes_sent=len(text))


def _result(ok: bool = True, *, detail: str = "", bytes_sent: int = 0) -> ExportResult:
    # Imported on use: the export package loads only when something exports.
    from ._base import SUCCESS, ExportResult, ExportStatus

    if ok and not detail and not bytes_sent:
        return SUCCESS
    status = ExportStatus.SUCCESS if ok else ExportStatus.PERMANENT
    return ExportResult(status, bytes_sent=bytes_sent, detail=detail)


class _SpanStore:
    """The in-memory span store behind :class:`InMemorySpanSink` (and its deprecated
    ``zerver.export.InMemoryExporter`` name, whose ``export`` needs a ``ctx``)."""

    def __init__(self, maxlen: int | None = 100_000) -> None:
        self._spans: deque[SpanData] = deque(maxlen=maxlen)
        self.traces: deque[list[SpanData]] = deque(maxlen=maxlen)
        self.dropped = 0
        self.batches = 0
        self.closed = False
        self._lock = threading.Lock()

    def _keep(self, spans: Sequence[SpanData]) -> ExportResult:
        batch = list(spans)
        with self._lock:
            maxlen = self._spans.maxlen
            if maxlen is not None:
                overflow = len(self._spans) + len(batch) - maxlen
                if overflow > 0:
                    self.dropped += overflow
            self._spans.extend(batch)
            self.traces.append(batch)
            self.batches += 1
        return _result()

    @property
    def spans(self) -> list[SpanData]:
        """A copy of every kept span, in arrival order (safe while a pipeline thread exports)."""
        with self._lock:
            return list(self._spans)

    def by_name(self, name: str) -> list[SpanData]:
        """Every kept span called ``name``."""
        return [s for s in self.spans if s.name == name]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self.traces.clear()
            self.batches = 0

    def shutdown(self) -> None:
        self.closed = True


class InMemorySpanSink(_SpanStore):
    """Keeps the most recent ``maxlen`` spans (``None``: all); older ones are dropped and
    counted. Thread-safe, so an export pipeline may feed it too.

    ``spans`` is a copy of every kept span in arrival order; ``traces`` holds
    one list per ``export`` call (a request's spans from the trace engine, a
    batch from a pipeline); ``batches`` counts those calls; ``closed`` says
    whether ``shutdown()`` was called.
    """

    def export(self, spans: Sequence[SpanData], ctx: ExportContext | None = None) -> ExportResult:
        return self._keep(spans)


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


# The attributes a tree line shows, in this order, when the span has them: what
# tells one request or effect from another at a glance. When a key and the older
# name of the same thing are both present, the first wins (``_SAME``).
_KEY_ATTRIBUTES = (
    "http.response.status_code",
    "http.status_code",
    "url.path",
    "http.target",
    "url.full",
    "http.url",
    "zerver.step.decision",
    "db.key",
    "cache.hit",
    "messaging.destination.name",
    "error.type",
    "job.queue_wait_ms",
    "job.park_wait_ms_total",
    "job.attempt",
    "zerver.sampling.reason",
)
_SAME = {
    "http.status_code": "http.response.status_code",
    "http.target": "url.path",
    "http.url": "url.full",
}
# Values that say nothing on a tree line: no wait, a first attempt.
_QUIET = {"job.queue_wait_ms": (0, 0.0), "job.park_wait_ms_total": (0, 0.0), "job.attempt": (1,)}


def _key_attributes(attributes: Mapping[str, AttrValue]) -> str:
    shown: list[str] = []
    for key in _KEY_ATTRIBUTES:
        if key not in attributes:
            continue
        same = _SAME.get(key)
        if same is not None and same in attributes:
            continue
        value = attributes[key]
        if value in _QUIET.get(key, ()):
            continue
        if isinstance(value, str):
            text = value
        elif isinstance(value, float):
            text = f"{value:.3f}"
        else:
            text = repr(value)
        shown.append(f"{key}={text}")
    return " ".join(shown)


def format_trace(spans: Sequence[SpanData]) -> str:
    """One trace as an indented tree: a header with the trace id, then per span its
    name, duration, kind, ``ERROR`` (and why) when it failed, and the attributes that
    tell it apart.

    Children are indented under their parent in start order; a span whose parent
    is not among ``spans`` is shown at the top level. Lines end without newline
    on the last one.
    """
    roots, children = span_tree(spans)
    trace_id = spans[0].trace_id if spans else 0
    noun = "span" if len(spans) == 1 else "spans"
    lines = [f"trace {trace_id:032x} ({len(spans)} {noun})"]

    def walk(span: SpanData, depth: int) -> None:
        ms = (span.end_ns - span.start_ns) / 1e6
        parts = [f"{'  ' * depth}{span.name}", f"{ms:.3f} ms", KIND_NAMES.get(span.kind, "?")]
        if span.status_code == StatusCode.ERROR:
            parts.append(f"ERROR: {span.status_message}" if span.status_message else "ERROR")
        attrs = _key_attributes(span.attributes)
        if attrs:
            parts.append(attrs)
        lines.append("  ".join(parts))
        for child in sorted(children.get(span.span_id, ()), key=lambda c: c.start_ns):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda r: r.start_ns):
        walk(root, 1)
    return "\n".join(lines)


def _by_trace(spans: Sequence[SpanData]) -> list[list[SpanData]]:
    groups: dict[int, list[SpanData]] = {}
    for span in spans:
        groups.setdefault(span.trace_id, []).append(span)
    return list(groups.values())


def traces_text(spans: Sequence[SpanData]) -> str:
    """Each trace among ``spans`` as :func:`format_trace` draws it, followed by a
    blank line: what the console writes for a person at a terminal."""
    return "".join(format_trace(trace) + "\n\n" for trace in _by_trace(spans))


class ConsoleSpanSink:
    """Writes spans to a text stream, for development (this is I/O).

    ``layout="tree"`` writes each trace of an ``export`` call as an indented
    tree (:func:`format_trace`: durations, kinds, errors, the attributes that
    tell spans apart, as the console exporter draws them), to ``sys.stderr`` by
    default;
    ``layout="lines"`` writes one line per span with ids, status and
    attributes, to ``sys.stdout`` by default (``OTEL_TRACES_EXPORTER=console``,
    as the OpenTelemetry SDK's console exporter). A failed write is reported
    (``PERMANENT``) instead of raised.
    """

    __slots__ = ("_lock", "_stream", "layout")

    def __init__(
        self, stream: TextIO | None = None, *, layout: Literal["tree", "lines"] = "tree"
    ) -> None:
        if layout not in ("tree", "lines"):
            raise ValueError(f"layout must be 'tree' or 'lines', got {layout!r}")
        self._stream = stream
        self.layout = layout
        self._lock = threading.Lock()

    @property
    def stream(self) -> TextIO:
        """Where it writes (the default stream is looked up at each write)."""
        if self._stream is not None:
            return self._stream
        return sys.stderr if self.layout == "tree" else sys.stdout

    def export(self, spans: Sequence[SpanData], ctx: ExportContext | None = None) -> ExportResult:
        if self.layout == "tree":
            text = traces_text(spans)
        else:
            text = "".join(format_span(s) + "\n" for s in spans)
        return write_text(self.stream, self._lock, text)

    def shutdown(self) -> None:
        return None


class PipelineSink:
    """A :class:`~zerver.SpanSink` that hands spans to an export pipeline.

    ``export`` is a bounded-buffer append per span (no I/O); ``shutdown``
    drains the pipeline within ``drain_timeout_s``.
    """

    def __init__(self, pipeline: ExportPipeline, *, drain_timeout_s: float = 10.0) -> None:
        self.pipeline = pipeline
        self._submit = pipeline.submit
        self.drain_timeout_s = drain_timeout_s

    def export(self, spans: list[SpanData]) -> None:
        submit = self._submit
        for span in spans:
            submit(span)

    def shutdown(self) -> None:
        report = self.pipeline.shutdown(self.drain_timeout_s)
        self._log_totals("trace export stopped", report.not_sent)

    def abandon(self) -> None:
        """Stop at once: what is buffered or in flight is counted as abandoned."""
        self._log_totals("trace export abandoned", self.pipeline.abandon())

    def _log_totals(self, event: str, not_sent: int) -> None:
        stats = self.pipeline.stats()
        dropped = {k: v for k, v in stats.dropped.items() if v}
        (_log.warning if dropped or not_sent else _log.info)(
            event,
            spans_exported=stats.exported,
            spans_replayed=stats.replayed,
            spans_spooled=stats.spooled,
            spans_dropped=dropped,
            not_sent=not_sent,
            spool=os.path.dirname(stats.spool.path) if stats.spool is not None else None,
            spool_items=stats.spool.items if stats.spool is not None else 0,
        )
