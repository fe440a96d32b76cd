"""The load test's OTLP/HTTP receiver: counts spans, root SERVER spans, and
attributes spans to the route of their trace's root.

Built on :class:`zerver.export.OtlpReceiver` (threaded, 127.0.0.1, decodes
protobuf, gzip too, once per request as a collector would): its responder hook
queues the decoded request, which a tally thread counts off the answer's path
and drops, so a long run holds counters, not payloads.

OTLP/JSON bodies are counted without building the document
(:func:`scan_json_spans`): parsing every attribute of every span only to count
the spans cost the receiver as much CPU as zerver's exporter spent encoding them,
on the core the load generator and the exporter share. The scan is exact or
declines: a body it cannot read exactly is parsed in full.
"""

from __future__ import annotations

import dataclasses
import gc
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from zerver.export import OtlpReceiver, ReceivedRequest, Reply, SpanKind
from zerver.export._metrics_exporter import metrics_from_json

__all__ = [
    "MetricsReceiver",
    "RouteTally",
    "SpanReceiver",
    "SpanTally",
    "TallySnapshot",
    "scan_json_spans",
]

_ROUTE_KEYS = ("http.route", "url.path", "http.target")
_STOP = object()


@dataclass(slots=True)
class RouteTally:
    """Spans of the traces whose root has one route (or name)."""

    roots: int = 0
    spans: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TallySnapshot:
    spans: int
    """Every span received."""
    root_server_spans: int
    """Spans of kind SERVER without a parent: one per traced request."""
    export_requests: int
    decode_errors: int
    rejected_requests: int = 0
    """Export requests the receiver answered with an error (undecodable, wrong path)."""
    rejected_detail: tuple[str, ...] = ()
    by_root: dict[str, RouteTally] = field(default_factory=dict)
    """Per root key (``http.route``, else ``url.path``/``http.target``, else the
    span name); spans whose trace root never arrived are under ``""``."""


@dataclass(slots=True)
class _Trace:
    root: str | None = None
    spans: int = 0


class SpanTally:
    """Thread-safe counters fed decoded OTLP payloads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._traces: dict[str, _Trace] = {}
        self.spans = 0
        self.root_server_spans = 0
        self.export_requests = 0
        self.decode_errors = 0

    def add_protobuf(self, message: ExportTraceServiceRequest) -> None:
        rows: list[tuple[str, str | None]] = []
        for rs in message.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    root = None
                    if span.kind == SpanKind.SERVER and not span.parent_span_id:
                        attrs = {a.key: a.value.string_value for a in span.attributes}
                        root = _root_key(attrs, span.name)
                    rows.append((span.trace_id.hex(), root))
        self._add(rows)

    def add_json(self, doc: dict[str, Any]) -> None:
        rows: list[tuple[str, str | None]] = []
        for rs in doc.get("resourceSpans", ()):
            for ss in rs.get("scopeSpans", ()):
                for span in ss.get("spans", ()):
                    root = None
                    if _is_server(span.get("kind")) and not span.get("parentSpanId"):
                        attrs = {
                            a.get("key"): a.get("value", {}).get("stringValue")
                            for a in span.get("attributes", ())
                        }
                        root = _root_key(attrs, str(span.get("name", "")))
                    rows.append((str(span.get("traceId", "")), root))
        self._add(rows)

    def add_rows(self, rows: list[tuple[str, str | None]]) -> None:
        """Count spans read by :func:`scan_json_spans`."""
        self._add(rows)

    def add_error(self) -> None:
        with self._lock:
            self.decode_errors += 1

    def _add(self, rows: list[tuple[str, str | None]]) -> None:
        """Count decoded spans: (trace id, root key when the span is a root SERVER span)."""
        with self._lock:
            self.export_requests += 1
            self.spans += len(rows)
            traces = self._traces
            for trace_id, root in rows:
                trace = traces.get(trace_id)
                if trace is None:
                    trace = traces[trace_id] = _Trace()
                trace.spans += 1
                if root is not None:
                    self.root_server_spans += 1
                    trace.root = root

    def snapshot(self) -> TallySnapshot:
        with self._lock:
            by_root: dict[str, RouteTally] = {}
            for trace in self._traces.values():
                tally = by_root.setdefault(trace.root or "", RouteTally())
                tally.spans += trace.spans
                if trace.root is not None:
                    tally.roots += 1
            return TallySnapshot(
                spans=self.spans,
                root_server_spans=self.root_server_spans,
                export_requests=self.export_requests,
                decode_errors=self.decode_errors,
                by_root=by_root,
            )


def _root_key(attrs: dict[str, str | None], name: str) -> str:
    for key in _ROUTE_KEYS:
        value = attrs.get(key)
        if value:
            return value
    return name


def _is_server(kind: object) -> bool:
    return kind in (SpanKind.SERVER, "SPAN_KIND_SERVER")


# -- counting OTLP/JSON without parsing it --------------------------------------------
#
# Why a byte pattern can be exact here: in JSON a quote inside a string is always
# escaped, so ``"startTimeUnixNano":`` (a quote, the name, a quote, a colon) only
# occurs as an object member's name, never inside a string value, and OTLP/JSON
# names its members by the schema (attribute keys are values of "key" members).
# Only span objects have ``startTimeUnixNano``; a span object starting with
# ``{"traceId"`` and reaching ``"name"`` and ``"kind"`` in the order zerver's
# encoder writes them is matched by _SPAN_HEAD (links start alike but have no
# name). When the two counts differ (another member order, kinds as enum names,
# an empty parent id), the body is parsed in full instead.

# JSON string contents, unrolled (``[^"\\]*(?:\\.[^"\\]*)*``): an alternation per
# character costs several times more in the regex engine.
_STR = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'
_SPAN_HEAD = re.compile(
    rb'\{"traceId":"([0-9a-f]{32})","spanId":"[0-9a-f]{16}"'
    rb'(?:,"traceState":"[^"\\]*(?:\\.[^"\\]*)*")?'
    rb'(,"parentSpanId":"[0-9a-f]{16}")?'
    rb'(?:,"flags":\d+)?'
    rb',"name":' + _STR + rb',"kind":(\d+),'
)
_SPAN_MEMBER = b'"startTimeUnixNano":'
_ROUTE_ATTR = re.compile(
    rb'\{"key":"(http\.route|url\.path|http\.target)","value":\{"stringValue":' + _STR + rb"\}\}"
)
_ROUTE_KEY_MEMBERS = tuple(b'{"key":"%s"' % k.encode() for k in _ROUTE_KEYS)
# Between a root span's head and the next span, any of these means attributes that
# are not the span's own flat ones (nested values, events, links, the next scope's
# or resource's): that body is parsed in full.
_NOT_FLAT = tuple(
    b'"%s":' % m
    for m in (b"kvlistValue", b"arrayValue", b"events", b"links", b"scope", b"resource")
)
_SERVER = b"%d" % SpanKind.SERVER


def _text(raw: bytes) -> str:
    """A JSON string's contents (without its quotes) as text."""
    if b"\\" not in raw:
        return raw.decode()
    text: str = orjson.loads(b'"' + raw + b'"')
    return text


def _scan_root(body: bytes, start: int, end: int, name: bytes) -> str | None:
    """The root key of the root span whose attributes lie in ``body[start:end]``
    (as :func:`_root_key` gives it), or None when it cannot be told exactly."""
    for marker in _NOT_FLAT:
        if body.find(marker, start, end) >= 0:
            return None
    found = _ROUTE_ATTR.findall(body, start, end)
    if len(found) != sum(body.count(k, start, end) for k in _ROUTE_KEY_MEMBERS):
        return None  # a route key whose value is not a plain string
    attrs = {key.decode(): value for key, value in found}  # the last one wins, as in a dict
    for key in _ROUTE_KEYS:
        value = attrs.get(key)
        if value:
            return _text(value)
    return _text(name)


def scan_json_spans(body: bytes) -> list[tuple[str, str | None]] | None:
    """(trace id, root key or None) for each span of an OTLP/JSON traces body, in
    order, as :meth:`SpanTally.add_json` of the parsed document would count them,
    read without parsing the document; None when it cannot be read exactly that way.
    """
    stripped = body.strip()
    if not (stripped.startswith(b"{") and stripped.endswith(b"}")):
        return None
    heads = list(_SPAN_HEAD.finditer(body))
    if not heads or len(heads) != body.count(_SPAN_MEMBER):
        return None  # (no span read this way is no proof of no span: parsed in full)
    rows: list[tuple[str, str | None]] = []
    last = len(heads) - 1
    for i, m in enumerate(heads):
        trace_id, parent, name, kind = m.groups()
        root = None
        if parent is None and kind == _SERVER:
            end = heads[i + 1].start() if i < last else len(body)
            root = _scan_root(body, m.end(), end, name)
            if root is None:
                return None
        rows.append((trace_id.decode(), root))
    return rows


class _Rows(list[tuple[str, str | None]]):
    """Spans counted by :func:`scan_json_spans` (the receiver's JSON "document")."""


def _count_json(body: bytes) -> tuple[Any, int]:
    rows = scan_json_spans(body)
    if rows is not None:
        return _Rows(rows), len(rows)
    doc = orjson.loads(body)
    return doc, sum(
        len(ss.get("spans", ()))
        for rs in doc.get("resourceSpans", ())
        for ss in rs.get("scopeSpans", ())
    )


class SpanReceiver:
    """An OTLP/HTTP traces receiver on 127.0.0.1 that tallies what it accepts.

    ``endpoint`` is the base URL to give as ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (exporters append ``/v1/traces``). The HTTP thread decodes each body once (as
    :class:`~zerver.export.OtlpReceiver` does, like a collector), queues the
    decoded request and answers; one tally thread counts its spans per route,
    off the answer's path. The queue is bounded: when it is full the HTTP thread
    waits (the exporter sees a slow collector), and nothing is ever dropped here.
    """

    def __init__(self, *, max_pending: int = 512) -> None:
        self.tally = SpanTally()
        self._receiver = OtlpReceiver(responder=self._on_request, decode_json=_count_json)
        self._pending: queue.Queue[Any] = queue.Queue(max_pending)
        self._decoder: threading.Thread | None = None
        self._last = time.monotonic()
        self._gc_was_enabled = False

    def _on_request(self, req: ReceivedRequest) -> Reply | None:
        # The receiver decoded the body already (a protobuf one as a collector would,
        # a JSON one counted by scan_json_spans): tally that.
        req.body = b""
        self._pending.put(req.document)
        self._last = time.monotonic()
        return None  # the receiver's default: 200 with an empty export response

    def _decode_loop(self) -> None:
        while True:
            item = self._pending.get()
            try:
                if item is _STOP:
                    return
                try:
                    if isinstance(item, _Rows):
                        self.tally.add_rows(item)
                    elif isinstance(item, ExportTraceServiceRequest):
                        self.tally.add_protobuf(item)
                    else:
                        self.tally.add_json(item)
                except Exception:
                    self.tally.add_error()
            finally:
                self._pending.task_done()

    def start(self) -> SpanReceiver:
        # Decoded documents are acyclic and freed by reference counting; with the
        # cyclic collector on, every few thousand of their objects set off a
        # collection that also walks the growing tally, and the receiver (which
        # stands in for a collector, not a Python program) cost ~10x more per span,
        # on the core it shares with the load generator and the exporter process.
        self._gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        if self._decoder is None:
            self._decoder = threading.Thread(target=self._decode_loop, name="span-tally")
            self._decoder.start()
        self._receiver.start()
        return self

    def stop(self) -> None:
        self._receiver.stop()
        if self._decoder is not None:
            self._pending.put(_STOP)
            self._decoder.join()
            self._decoder = None
        if self._gc_was_enabled:
            gc.enable()

    def go_down(self) -> None:
        """Stop listening, as a collector that went away (the tally keeps what it has)."""
        self._receiver.stop()

    def come_back(self) -> None:
        """Listen again on the same port after :meth:`go_down`."""
        self._receiver.start()

    def __enter__(self) -> SpanReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._receiver.port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._receiver.port}"

    @property
    def traces_endpoint(self) -> str:
        return self._receiver.endpoint

    def wait_quiet(self, quiet_s: float = 0.3, timeout_s: float = 3.0) -> bool:
        """Wait until nothing arrived for ``quiet_s`` and all of it is tallied.

        False if that did not happen within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        for _ in _ticks(deadline):
            if time.monotonic() - self._last >= quiet_s and self._pending.unfinished_tasks == 0:
                return True
        return False

    def snapshot(self) -> TallySnapshot:
        snap = self.tally.snapshot()
        rejected = [r for r in self._receiver.requests if r.status >= 300 or r.error]
        return dataclasses.replace(
            snap,
            rejected_requests=len(rejected),
            rejected_detail=tuple(f"{r.status} {r.path} {r.error}"[:200] for r in rejected[:3]),
        )


#: The server-duration histograms whose counts are the requests a server reports.
_DURATIONS = ("http.server.request.duration", "http.server.duration")


class MetricsReceiver:
    """An OTLP/HTTP metrics receiver on 127.0.0.1 (``/v1/metrics``) that keeps, per
    export request, how many requests its server-duration histogram counts.

    With cumulative temporality each export holds every request so far: the
    largest count is what the server reported in all. Bodies parse with the
    official message types (protobuf, or JSON through ``metrics_from_json``), so a
    malformed export is an error here as it would be in a collector.
    """

    def __init__(self) -> None:
        self._receiver = OtlpReceiver(path="/v1/metrics", responder=self._on_request)
        self._lock = threading.Lock()
        self.export_requests = 0
        self.errors = 0
        self.requests_counted = 0
        """The largest server-duration count of one export (one instrument, all series)."""

    def _on_request(self, req: ReceivedRequest) -> Reply | None:
        try:
            doc = req.document
            if not isinstance(doc, ExportMetricsServiceRequest):
                doc = metrics_from_json(doc)
            counts = dict.fromkeys(_DURATIONS, 0)
            for rm in doc.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name in counts:
                            counts[m.name] += sum(p.count for p in m.histogram.data_points)
        except Exception:
            with self._lock:
                self.errors += 1
            return Reply(400)
        with self._lock:
            self.export_requests += 1
            self.requests_counted = max(self.requests_counted, *counts.values())
        req.body = b""
        return None

    def start(self) -> MetricsReceiver:
        self._receiver.start()
        return self

    def stop(self) -> None:
        self._receiver.stop()

    def __enter__(self) -> MetricsReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The full metrics URL (``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``)."""
        return self._receiver.endpoint


def _ticks(deadline: float, step_s: float = 0.05) -> Iterator[None]:
    while time.monotonic() < deadline:
        yield
        time.sleep(step_s)
