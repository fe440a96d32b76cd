"""Bridges to the OpenTelemetry SDK, both ways.

- :class:`ZerverSpanProcessor` is an SDK ``SpanProcessor``: spans created
  through the OpenTelemetry API leave through a zerver :class:`ExportPipeline`.
  ``on_end`` hands the SDK's ``ReadableSpan`` over as it is; the conversion to
  :class:`SpanData` happens on the pipeline's worker, off the request path.
- :class:`ZerverSpanExporter` is an SDK ``SpanExporter`` wrapping any zerver
  exporter layer (e.g. the resilient OTLP/HTTP JSON one), for plain SDK apps
  that keep their ``BatchSpanProcessor``.
- :func:`span_from_readable` / :func:`span_to_readable` convert single spans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState
from opentelemetry.trace import SpanKind as SdkSpanKind
from opentelemetry.trace import Status as SdkStatus
from opentelemetry.trace import StatusCode as SdkStatusCode

from ._base import BatchExporter, ExportContext, ExportStatus
from ._json import IdentityCache
from ._spans import (
    FLAG_HAS_REMOTE,
    FLAG_IS_REMOTE,
    AttrValue,
    InstrumentationScope,
    Resource,
    SpanData,
    SpanEvent,
    SpanLink,
)

__all__ = [
    "ZerverSpanExporter",
    "ZerverSpanProcessor",
    "span_from_readable",
    "span_to_readable",
]

_EMPTY_SCOPE = InstrumentationScope(name="")
_EMPTY_RESOURCE = Resource()

# SDK objects are shared by every span of a provider/tracer; convert each once.
_resources: IdentityCache[SdkResource, Resource] = IdentityCache()
_scopes: IdentityCache[SdkScope, InstrumentationScope] = IdentityCache()


def _resource(r: SdkResource | None) -> Resource:
    if r is None:
        return _EMPTY_RESOURCE
    hit = _resources.get(r)
    if hit is not None:
        return hit
    return _resources.put(
        r, Resource(attributes=_attrs(r.attributes), schema_url=r.schema_url or "")
    )


def _scope(s: SdkScope | None) -> InstrumentationScope:
    if s is None:
        return _EMPTY_SCOPE
    hit = _scopes.get(s)
    if hit is not None:
        return hit
    return _scopes.put(
        s,
        InstrumentationScope(
            name=s.name,
            version=s.version or "",
            attributes=_attrs(s.attributes),
            schema_url=s.schema_url or "",
        ),
    )


def _flags(ctx: SpanContext, parent: SpanContext | None) -> int:
    flags = int(ctx.trace_flags) | FLAG_HAS_REMOTE
    if parent is not None and parent.is_remote:
        flags |= FLAG_IS_REMOTE
    return flags


def _trace_state(ts: TraceState | None) -> str:
    return ts.to_header() if ts else ""


def _attrs(a: Mapping[str, object] | None) -> dict[str, AttrValue]:
    return dict(a) if a else {}  # type: ignore[arg-type]


def span_from_readable(span: ReadableSpan) -> SpanData:
    """Convert an SDK ``ReadableSpan`` to :class:`SpanData`.

    ``flags`` carries the W3C trace flags plus the OTLP "parent is remote"
    bits, as the OTLP spec defines them.
    """
    ctx = span.context
    if ctx is None:
        raise ValueError(f"span {span.name!r} has no span context")
    parent = span.parent
    events = [
        SpanEvent(e.name, e.timestamp, _attrs(e.attributes), e.dropped_attributes)
        for e in span.events
    ]
    links = [
        SpanLink(
            link.context.trace_id,
            link.context.span_id,
            trace_state=_trace_state(link.context.trace_state),
            attributes=_attrs(link.attributes),
            flags=_flags(link.context, link.context),
            dropped_attributes_count=link.dropped_attributes,
        )
        for link in span.links
    ]
    status = span.status
    return SpanData(
        name=span.name,
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_span_id=parent.span_id if parent is not None else 0,
        kind=span.kind.value + 1,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        attributes=_attrs(span.attributes),
        events=events,
        links=links,
        status_code=status.status_code.value,
        status_message=status.description or "",
        trace_state=_trace_state(ctx.trace_state),
        flags=_flags(ctx, parent),
        resource=_resource(span.resource),
        scope=_scope(span.instrumentation_scope),
        dropped_attributes_count=span.dropped_attributes,
        dropped_events_count=span.dropped_events,
        dropped_links_count=span.dropped_links,
    )


def span_to_readable(
    span: SpanData,
    *,
    resource: SdkResource | None = None,
    scope: SdkScope | None = None,
) -> ReadableSpan:
    """Convert :class:`SpanData` to an SDK ``ReadableSpan`` (to feed SDK exporters).

    Pass shared ``resource``/``scope`` objects to avoid one copy per span.
    Dropped counts cannot be carried: the SDK derives them from its own limits.
    """
    res = resource or SdkResource(dict(span.resource.attributes), span.resource.schema_url or None)
    sc = scope or SdkScope(
        span.scope.name,
        span.scope.version or None,
        span.scope.schema_url or None,
        dict(span.scope.attributes),
    )
    ts = TraceState.from_header([span.trace_state]) if span.trace_state else None
    ctx = SpanContext(span.trace_id, span.span_id, False, TraceFlags(span.flags & 0xFF), ts)
    parent = (
        SpanContext(span.trace_id, span.parent_span_id, bool(span.flags & FLAG_IS_REMOTE))
        if span.parent_span_id
        else None
    )
    links = [
        Link(
            SpanContext(
                link.trace_id,
                link.span_id,
                bool(link.flags & FLAG_IS_REMOTE),
                TraceFlags(link.flags & 0xFF),
                TraceState.from_header([link.trace_state]) if link.trace_state else None,
            ),
            dict(link.attributes),
        )
        for link in span.links
    ]
    return ReadableSpan(
        name=span.name,
        context=ctx,
        parent=parent,
        resource=res,
        attributes=dict(span.attributes),
        events=[Event(name, dict(attrs), time_ns) for name, time_ns, attrs, _ in span.events],
        links=links,
        kind=SdkSpanKind(max(span.kind - 1, 0)),
        instrumentation_scope=sc,
        status=SdkStatus(SdkStatusCode(span.status_code), span.status_message or None),
        start_time=span.start_ns,
        end_time=span.end_ns,
    )


class _Pipeline(Protocol):
    def submit(self, span: SpanData | ReadableSpan) -> None: ...

    def force_flush(self, timeout: float | None = None) -> bool: ...

    def shutdown(self, timeout: float = ...) -> object: ...


class ZerverSpanProcessor(SpanProcessor):
    """An SDK ``SpanProcessor`` that hands ended spans to a zerver pipeline.

    ``on_end`` costs one ``pipeline.submit`` (a bounded-buffer append); the
    conversion happens on the pipeline's worker thread.

    Example::

        provider = TracerProvider()
        provider.add_span_processor(ZerverSpanProcessor(pipeline))
    """

    def __init__(self, pipeline: _Pipeline, *, shutdown_pipeline: bool = True) -> None:
        self._pipeline = pipeline
        self._shutdown_pipeline = shutdown_pipeline
        self.on_end = pipeline.submit  # type: ignore[method-assign]

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:  # replaced per instance in __init__
        self._pipeline.submit(span)

    def shutdown(self) -> None:
        if self._shutdown_pipeline:
            self._pipeline.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._pipeline.force_flush(timeout_millis / 1000)


class ZerverSpanExporter(SpanExporter):
    """An SDK ``SpanExporter`` that sends through a zerver exporter layer.

    Example::

        exporter = ZerverSpanExporter(ResilienceBuilder(OtlpHttpExporter(...)).build())
        provider.add_span_processor(BatchSpanProcessor(exporter))
    """

    def __init__(self, exporter: BatchExporter, *, timeout_s: float = 30.0) -> None:
        self._exporter = exporter
        self._timeout_s = timeout_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            batch = [span_from_readable(s) for s in spans]
            result = self._exporter.export(batch, ExportContext.with_timeout(self._timeout_s))
        except Exception:
            return SpanExportResult.FAILURE
        if result.status is ExportStatus.SUCCESS:
            return SpanExportResult.SUCCESS
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
