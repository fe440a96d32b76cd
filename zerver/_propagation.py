"""Trace context in and out of the process, through the OpenTelemetry propagator API.

The propagators are the ones ``OTEL_PROPAGATORS`` names (default
``tracecontext,baggage``). Extraction only runs when a request carries one of
their headers, so requests without trace context pay nothing for it; invalid
headers are ignored as the W3C specifications require (a new trace starts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import Token

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context as OtelContext
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)

from ._errors import ConfigError
from ._records import RequestRecord


def _textmap() -> TextMapPropagator:
    """The global propagator; a bad ``OTEL_PROPAGATORS`` is a ConfigError, not a crash."""
    try:
        # Imported here: OpenTelemetry reads OTEL_PROPAGATORS when the module loads.
        from opentelemetry import propagate
    except (ValueError, ImportError) as exc:
        value = os.environ.get("OTEL_PROPAGATORS", "")
        raise ConfigError(
            f"OTEL_PROPAGATORS={value!r} is invalid: accepted: a comma-separated list of "
            f"installed propagators such as tracecontext, baggage, none ({exc})"
        ) from None
    return propagate.get_global_textmap()


__all__ = [
    "attach_span",
    "context_for",
    "extract_into",
    "inject",
    "link_message_context",
    "propagation_fields",
]


def propagation_fields() -> frozenset[bytes]:
    """Lower-cased header names the configured propagators read, as bytes."""
    return frozenset(f.lower().encode("latin-1") for f in _textmap().fields)


def extract_into(record: RequestRecord, carrier: Mapping[str, list[str]]) -> None:
    """Continue the caller's trace (if valid) and keep its baggage on ``record``."""
    ctx = _textmap().extract(carrier)
    _continue(record, ctx, get_current_span(ctx).get_span_context(), carrier)


def _continue(
    record: RequestRecord, ctx: OtelContext, sc: SpanContext, carrier: Mapping[str, list[str]]
) -> None:
    """Make the extracted ``ctx`` (whose span context is ``sc``) the parent of ``record``."""
    if sc.is_valid:
        record.trace_id = sc.trace_id
        record.parent_span_id = sc.span_id
        record.trace_flags = int(sc.trace_flags)
        record.parent_remote = True
        state = sc.trace_state.to_header() if sc.trace_state else ""
        record.tracestate = state or None
        values = carrier.get("traceparent")
        record.traceparent = values[0].strip() if values else None
    entries = otel_baggage.get_all(ctx)
    if entries:
        record.baggage = {k: str(v) for k, v in entries.items()}


def link_message_context(
    record: RequestRecord, carrier: Mapping[str, list[str]], *, continue_trace: bool
) -> None:
    """Link a consumer's record to the producer context in a message's headers,
    and continue its trace unless ``continue_trace`` is false."""
    ctx = _textmap().extract(carrier)
    sc = get_current_span(ctx).get_span_context()
    if not sc.is_valid:
        return
    state = sc.trace_state.to_header() if sc.trace_state else ""
    record.links.append((sc.trace_id, sc.span_id, state))
    if continue_trace:
        _continue(record, ctx, sc, carrier)


def context_for(record: RequestRecord, span_id: int) -> OtelContext:
    """An OpenTelemetry context whose current span is ``span_id`` of the request's trace."""
    state = TraceState.from_header([record.tracestate]) if record.tracestate else None
    sc = SpanContext(record.trace_id, span_id, False, TraceFlags(record.trace_flags & 0xFF), state)
    ctx = set_span_in_context(NonRecordingSpan(sc))
    if record.baggage:
        for key, value in record.baggage.items():
            ctx = otel_baggage.set_baggage(key, value, ctx)
    return ctx


def inject(record: RequestRecord, span_id: int, carrier: dict[str, str]) -> None:
    """Write the headers that make ``span_id`` the parent of the receiver's work."""
    _textmap().inject(carrier, context=context_for(record, span_id))


def attach_span(record: RequestRecord, span_id: int) -> Token[OtelContext]:
    """Make ``span_id`` of the request's trace the current OpenTelemetry span.

    Cheaper than :func:`context_for`: no trace state or baggage, which user
    spans made in-process do not need.
    """
    span = NonRecordingSpan(
        SpanContext(record.trace_id, span_id, False, TraceFlags(record.trace_flags & 0xFF))
    )
    return otel_context.attach(set_span_in_context(span))
