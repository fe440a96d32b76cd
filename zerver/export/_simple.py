"""Exporters that need no network: no-op, fan-out and ``OTEL_TRACES_EXPORTER=console``,
and the former names of the console and in-memory sinks (now :mod:`zerver.export._sinks`)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, TextIO, get_args

import orjson

from zerver.core._errors import ConfigError

from ._base import (
    SUCCESS,
    BatchExporter,
    ExportContext,
    ExportResult,
    layers,
)
from ._sinks import (
    ConsoleSpanSink,
    _SpanStore,
    format_span,
    format_trace,
    traces_text,
    write_text,
)
from ._spans import KIND_NAMES, STATUS_NAMES, SpanData

__all__ = [
    "CONSOLE_FORMAT_VARIABLE",
    "ConsoleExporter",
    "ConsoleFormat",
    "ConsoleTraceExporter",
    "FanOutExporter",
    "InMemoryExporter",
    "NoopExporter",
    "console_format_from_env",
    "describe_destination",
    "format_span",
    "format_trace",
    "span_json",
]

ConsoleFormat = Literal["tree", "jsonl"]
CONSOLE_FORMAT_VARIABLE = "ZER_VER_CONSOLE_FORMAT"
_CONSOLE_FORMATS: tuple[str, ...] = get_args(ConsoleFormat)


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

    @property
    def exporters(self) -> tuple[BatchExporter, ...]:
        """The primary exporter, then the others."""
        return (self._primary, *self._others)

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        for other in self._others:
            with contextlib.suppress(Exception):  # a side channel never fails the batch
                other.export(spans, ctx)
        return self._primary.export(spans, ctx)

    def shutdown(self) -> None:
        for exporter in (self._primary, *self._others):
            exporter.shutdown()


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def span_json(span: SpanData) -> bytes:
    """One span as one line of JSON (no newline): hex ids as in OTLP/JSON, times in
    Unix nanoseconds, kind and status by name, attributes and events as they are."""
    doc = {
        "trace_id": f"{span.trace_id:032x}",
        "span_id": f"{span.span_id:016x}",
        "parent_span_id": f"{span.parent_span_id:016x}" if span.parent_span_id else None,
        "name": span.name,
        "kind": KIND_NAMES.get(span.kind, str(span.kind)),
        "start_time_unix_nano": span.start_ns,
        "end_time_unix_nano": span.end_ns,
        "duration_ms": (span.end_ns - span.start_ns) / 1e6,
        "status": {
            "code": STATUS_NAMES.get(span.status_code, str(span.status_code)),
            "message": span.status_message,
        },
        "attributes": dict(span.attributes),
        "events": [
            {"name": name, "time_unix_nano": at, "attributes": dict(attrs)}
            for name, at, attrs, *_ in span.events
        ],
        "resource": dict(span.resource.attributes),
    }
    return orjson.dumps(doc, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


def _tree_text(spans: Sequence[SpanData]) -> str:
    return traces_text(spans)


def _jsonl_text(spans: Sequence[SpanData]) -> str:
    return "".join(span_json(span).decode() + "\n" for span in spans)


def console_format_from_env(environ: Mapping[str, str] | None = None) -> ConsoleFormat:
    """``ZER_VER_CONSOLE_FORMAT``: ``tree`` (the default) or ``jsonl``, any case.

    Raises :class:`~zerver.ConfigError` naming the variable for anything else
    (start-up has checked it already, through the settings).
    """
    env = os.environ if environ is None else environ
    raw = next((v for k, v in env.items() if k.upper() == CONSOLE_FORMAT_VARIABLE), "")
    value = raw.strip().lower() or "tree"
    for known in ("tree", "jsonl"):
        if value == known:
            return known
    raise ConfigError(
        f"{CONSOLE_FORMAT_VARIABLE}={raw!r} is invalid: accepted: {', '.join(_CONSOLE_FORMATS)}"
    )


class ConsoleTraceExporter:
    """``OTEL_TRACES_EXPORTER=console``: finished traces on standard output (this is I/O,
    done on the export pipeline's thread, never on the request path).

    ``format="tree"`` writes each trace of a batch as an indented tree, one trace
    after the other (:func:`format_trace`), for a person at a terminal;
    ``format="jsonl"`` writes one JSON object per span and line (:func:`span_json`),
    for programs. The batch is written in one piece, so traces from two
    exporters sharing the stream do not interleave. A failed write is reported
    (``PERMANENT``), not raised.
    """

    __slots__ = ("_lock", "_render", "_stream", "format")

    def __init__(self, stream: TextIO | None = None, *, format: ConsoleFormat = "tree") -> None:
        if format not in _CONSOLE_FORMATS:
            raise ValueError(f"format must be one of {_CONSOLE_FORMATS}, got {format!r}")
        self._stream = stream
        self.format = format
        self._render: Callable[[Sequence[SpanData]], str] = (
            _tree_text if format == "tree" else _jsonl_text
        )
        self._lock = threading.Lock()

    @property
    def stream(self) -> TextIO:
        """Where it writes (``sys.stdout`` unless given, looked up at each write)."""
        return self._stream if self._stream is not None else sys.stdout

    def export(self, spans: Sequence[SpanData], ctx: ExportContext | None = None) -> ExportResult:
        if not spans:
            return SUCCESS
        return write_text(self.stream, self._lock, self._render(spans))

    def shutdown(self) -> None:
        return None


def describe_destination(exporter: object) -> str:
    """Where ``exporter`` sends spans, in words for a log line: the OTLP endpoint,
    ``standard output`` for the console, ``nowhere`` for the no-op exporter; the
    exporters of a fan-out joined by ``and``."""
    if isinstance(exporter, FanOutExporter):
        return " and ".join(describe_destination(e) for e in exporter.exporters)
    for layer in layers(exporter):
        endpoint = getattr(layer, "endpoint", None)
        if isinstance(endpoint, str):
            return endpoint
        if isinstance(layer, ConsoleTraceExporter | ConsoleSpanSink):
            return "standard output"
        if isinstance(layer, NoopExporter):
            return "nowhere"
    return type(exporter).__name__
