"""Span factories and hypothesis strategies shared by the export tests."""

from __future__ import annotations

import base64
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

from zerver.export import BatchExporter, ExportContext, ExportPipeline, ExportResult, ExportStatus
from zerver.export._base import SUCCESS
from zerver.export._spans import (
    AttrValue,
    InstrumentationScope,
    Resource,
    SpanData,
    SpanEvent,
    SpanKind,
    SpanLink,
    StatusCode,
)

RES = Resource(attributes={"service.name": "blog", "host.name": "box-1"})
SCOPE = InstrumentationScope(name="zerver", version="0.1.0")
T0 = 1_700_000_000_000_000_000
_ids = itertools.count(1)


def make_span(i: int = 0, **overrides: Any) -> SpanData:
    """A realistic CLIENT span with an event; ``overrides`` replace fields."""
    n = next(_ids)
    fields: dict[str, Any] = {
        "name": "db.get blog_post",
        "trace_id": (0x0AF7651916CD43DD8448EB211C80319C << 8 | n) & ((1 << 128) - 1),
        "span_id": 0x00F067AA0BA902B7 + n,
        "parent_span_id": 0x00F067AA0BA90000 + n,
        "kind": SpanKind.CLIENT,
        "start_ns": T0 + i * 1000,
        "end_ns": T0 + i * 1000 + 250_000,
        "attributes": {
            "http.request.method": "GET",
            "http.response.status_code": 200,
            "url.path": f"/blogs/posts/{i}",
            "server.port": 8080,
            "job.queue_wait_ms": 1.25,
            "job.success": True,
        },
        "events": [SpanEvent("zerver.job.enqueued", T0 + 100, {"job.queue": "effects"})],
        "resource": RES,
        "scope": SCOPE,
    }
    fields.update(overrides)
    return SpanData(**fields)


def hex_ids_to_base64(obj: dict[str, Any]) -> dict[str, Any]:
    """OTLP/JSON carries hex ids; protobuf's JSON mapping wants base64 bytes."""

    def conv(d: dict[str, Any], *keys: str) -> None:
        for k in keys:
            if k in d:
                d[k] = base64.b64encode(bytes.fromhex(d[k])).decode()

    for rs in obj.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                conv(span, "traceId", "spanId", "parentSpanId")
                for link in span.get("links", []):
                    conv(link, "traceId", "spanId")
    return obj


# -- hypothesis ---------------------------------------------------------------

keys = st.text(min_size=1, max_size=12)
int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
# One canonical NaN: OTLP/JSON's "NaN" cannot carry NaN payload or sign bits.
floats = st.one_of(st.floats(allow_nan=False), st.just(math.nan))
scalar: st.SearchStrategy[AttrValue] = st.one_of(st.text(max_size=20), st.booleans(), int64, floats)
arrays: st.SearchStrategy[AttrValue] = st.one_of(
    st.lists(st.text(max_size=8), max_size=4),
    st.lists(st.booleans(), max_size=4),
    st.lists(int64, max_size=4),
    st.lists(floats, max_size=4),
)
attr_values = st.one_of(scalar, arrays)
attributes = st.dictionaries(keys, attr_values, max_size=6)
u64 = st.integers(min_value=1, max_value=(1 << 64) - 1)
u128 = st.integers(min_value=1, max_value=(1 << 128) - 1)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
times = st.integers(min_value=0, max_value=(1 << 64) - 1)
trace_states = st.sampled_from(["", "congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61"])

resources = st.sampled_from(
    [
        RES,
        Resource(
            attributes={"service.name": "other"},
            schema_url="https://opentelemetry.io/schemas/1.26.0",
        ),
    ]
)
scopes = st.sampled_from(
    [
        SCOPE,
        InstrumentationScope(
            name="user.code", version="", attributes={"team": "x"}, schema_url="s"
        ),
    ]
)


@st.composite
def spans(draw: st.DrawFn, *, sdk_compatible: bool = False) -> SpanData:
    """Any span; ``sdk_compatible`` limits fields to what an SDK ReadableSpan can carry."""
    parent = draw(st.one_of(st.just(0), u64))
    if sdk_compatible:
        remote = parent != 0 and draw(st.booleans())
        flags = 0x100 | (0x200 if remote else 0)
        status_code = draw(st.sampled_from([StatusCode.UNSET, StatusCode.OK, StatusCode.ERROR]))
        message = draw(st.text(max_size=10)) if status_code == StatusCode.ERROR else ""
        kind = draw(st.integers(min_value=1, max_value=5))
        dropped = (0, 0, 0)
        link_flags = st.sampled_from([0x100, 0x300])
        ev_dropped = st.just(0)
        # The official encoder drops Link.trace_state (we keep it), so leave it out here.
        link_states = st.just("")
    else:
        flags = draw(u32)
        status_code = draw(st.integers(min_value=0, max_value=2))
        message = draw(st.text(max_size=10))
        kind = draw(st.integers(min_value=0, max_value=5))
        dropped = (draw(u32), draw(u32), draw(u32))
        link_flags = u32
        ev_dropped = u32
        link_states = trace_states
    events = draw(
        st.lists(
            st.builds(SpanEvent, st.text(max_size=10), times, attributes, ev_dropped), max_size=2
        )
    )
    links = draw(
        st.lists(
            st.builds(
                SpanLink,
                u128,
                u64,
                trace_state=link_states,
                attributes=attributes,
                flags=link_flags,
                dropped_attributes_count=ev_dropped,
            ),
            max_size=2,
        )
    )
    return SpanData(
        name=draw(st.text(max_size=20)),
        trace_id=draw(u128),
        span_id=draw(u64),
        parent_span_id=parent,
        kind=kind,
        start_ns=draw(times),
        end_ns=draw(times),
        attributes=draw(attributes),
        events=events,
        links=links,
        status_code=status_code,
        status_message=message,
        trace_state=draw(trace_states),
        flags=flags,
        resource=draw(resources),
        scope=draw(scopes),
        dropped_attributes_count=dropped[0],
        dropped_events_count=dropped[1],
        dropped_links_count=dropped[2],
    )


# -- time and scripted exporters ------------------------------------------------


class FakeTimer:
    """Virtual time: ``sleep`` advances it at once and records the wait."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def wake(self) -> None:
        pass


class Scripted:
    """An exporter answering from a script (the last answer repeats); records calls."""

    def __init__(self, *results: ExportResult) -> None:
        self.results = list(results) or [SUCCESS]
        self.calls: list[int] = []
        self.closed = False

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        self.calls.append(len(spans))
        if len(self.results) > 1:
            return self.results.pop(0)
        return self.results[0]

    def shutdown(self) -> None:
        self.closed = True


class Gated:
    """An exporter that holds every batch until ``gate`` is set (bounded wait)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.spans: list[SpanData] = []

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        self.entered.set()
        self.gate.wait(10)
        self.spans.extend(spans)
        return SUCCESS

    def shutdown(self) -> None:
        self.gate.set()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a cross-thread condition with a bounded deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


RETRY = ExportResult(ExportStatus.RETRYABLE, detail="HTTP 503")
PERMANENT = ExportResult(ExportStatus.PERMANENT, detail="HTTP 400")


def export_once(
    exporter: BatchExporter, spans: Sequence[SpanData], timeout: float = 5.0
) -> ExportResult:
    """One ``export`` of ``spans`` with a ``timeout`` deadline, then ``shutdown``."""
    try:
        return exporter.export(spans, ExportContext.with_timeout(timeout))
    finally:
        exporter.shutdown()


# -- pipelines --------------------------------------------------------------------

QUIET = 60.0  # a schedule delay long enough that only size, flush or shutdown export


def pipeline(exporter: object, **kwargs: object) -> ExportPipeline:
    """A pipeline that exports only full batches, on ``force_flush`` or at shutdown."""
    options: dict[str, object] = {"schedule_delay_s": QUIET}
    options.update(kwargs)
    return ExportPipeline(exporter, **options)  # type: ignore[arg-type]
