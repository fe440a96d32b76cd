"""Trace context in and out of the process.

The propagators are the ones ``OTEL_PROPAGATORS`` names (default
``tracecontext,baggage``). ``tracecontext`` (W3C ``traceparent`` and
``tracestate``) is parsed and written by this module, not by OpenTelemetry's
``TraceContextTextMapPropagator``, whose ``tracestate`` parser throws whole
valid headers away (keys of the current grammar such as ``foo@``, a repeated
key) and which sends unknown trace-flags bits on. Every other propagator
(``baggage``, ``b3``, ...) runs through the OpenTelemetry propagator API, in the
configured order. Extraction only runs when a request carries one of their
headers, so requests without trace context pay nothing for it.

Rules kept for W3C Trace Context (Level 2, https://www.w3.org/TR/trace-context-2/):

* ``traceparent`` is valid only as exactly one header field of at most 512
  characters (optional whitespace around it ignored): version ``00`` is exactly
  ``00-<32 hex>-<16 hex>-<2 hex>``; a higher version (not ``ff``) starts the same
  way and goes on, if at all, with ``-``. Hex is lower case; all-zero ids are
  invalid. Anything else, two header fields included, starts a new trace and
  drops ``tracestate`` unread.
* Of the trace flags only ``sampled`` (0x01) and ``random`` (0x02) are kept, on
  the request and on the way out; the other bits are reserved and sent as 0.
* ``tracestate`` fields are joined in order (RFC 9110, 5.3) and split on ``,``;
  empty and whitespace-only members are skipped. A member that breaks the
  grammar (key ``[a-z0-9][a-z0-9_-*/@]{0,255}``, value of 1 to 256 printable
  characters without ``,`` and ``=``, not ending in a space) or more than 32
  members make the header unparsable: all of it is dropped. A key seen again
  keeps its first (left-most, most recent) entry. Above 512 characters whole
  entries are dropped: first those longer than 128 characters, then from the
  right. The result is sent on as one field, members joined by ``,``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context as OtelContext
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from zerver.core._errors import ConfigError

from ._records import RequestRecord

__all__ = [
    "KNOWN_TRACE_FLAGS",
    "TRACEPARENT_MAX_CHARS",
    "TRACESTATE_MAX_CHARS",
    "TRACESTATE_MAX_MEMBERS",
    "TraceParent",
    "W3CTraceContextPropagator",
    "attach_span",
    "context_for",
    "extract_into",
    "format_traceparent",
    "inject",
    "link_message_context",
    "parse_traceparent",
    "parse_tracestate",
    "propagation_fields",
]

KNOWN_TRACE_FLAGS = 0x03
"""``sampled`` (0x01) and Level 2's ``random`` (0x02); other bits are zeroed."""
TRACEPARENT_MAX_CHARS = 512
"""A longer ``traceparent`` (only possible with a future version) is ignored."""
TRACESTATE_MAX_MEMBERS = 32
TRACESTATE_MAX_CHARS = 512
"""What is sent on at most: the size the specification asks every vendor to carry."""
_TRACESTATE_LARGE_ENTRY = 128

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACEPARENT_V00_CHARS = 55
_MEMBER = re.compile(
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_OWS = " \t"


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceParent:
    """A valid incoming ``traceparent``: ``flags`` holds the known bits only,
    ``header`` the value as received, without surrounding whitespace."""

    trace_id: int
    span_id: int
    flags: int
    header: str


def parse_traceparent(values: Sequence[str] | None) -> TraceParent | None:
    """The ``traceparent`` carried by ``values`` (one string per header field),
    or ``None`` when there is none or it is invalid. Never raises."""
    if isinstance(values, str):
        values = [values]
    if values is None or len(values) != 1:
        return None  # absent, or two fields: one invalid header
    header = values[0].strip(_OWS)
    if len(header) > TRACEPARENT_MAX_CHARS:
        return None
    match = _TRACEPARENT.match(header)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex = match.groups()
    rest = header[_TRACEPARENT_V00_CHARS:]
    if version == "ff" or (rest and (version == "00" or rest[0] != "-")):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    flags = int(flags_hex, 16) & KNOWN_TRACE_FLAGS
    return TraceParent(trace_id=trace_id, span_id=span_id, flags=flags, header=header)


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """A version ``00`` ``traceparent``; flag bits other than the known ones are zeroed."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags & KNOWN_TRACE_FLAGS:02x}"


def parse_tracestate(values: Sequence[str] | None) -> str | None:
    """The ``tracestate`` to carry on, given its header fields in order, as one
    header value; ``None`` when nothing is left. Never raises."""
    if not values:
        return None
    if isinstance(values, str):
        values = [values]
    members: list[str] = []
    keys: set[str] = set()
    count = 0
    for value in values:
        for item in value.split(","):
            member = item.strip(_OWS)
            if not member:
                continue
            count += 1
            if count > TRACESTATE_MAX_MEMBERS or _MEMBER.fullmatch(member) is None:
                return None
            key = member[: member.index("=")]
            if key not in keys:
                keys.add(key)
                members.append(member)
    # A single member can be longer than the limit (256 + 1 + 256 characters).
    return ",".join(_within_limit(members)) or None


def _within_limit(members: list[str]) -> list[str]:
    """``members`` without the entries the specification drops first to fit
    ``TRACESTATE_MAX_CHARS``: those over 128 characters, then the right-most."""
    size = sum(map(len, members)) + len(members) - 1
    if size <= TRACESTATE_MAX_CHARS:
        return members
    kept = list(members)
    for i in range(len(kept) - 1, -1, -1):
        if size <= TRACESTATE_MAX_CHARS:
            break
        if len(kept[i]) > _TRACESTATE_LARGE_ENTRY:
            size -= len(kept.pop(i)) + 1
    while size > TRACESTATE_MAX_CHARS:
        size -= len(kept.pop()) + 1
    return kept


# What this module parsed for one span context, kept beside it in an
# OpenTelemetry context: OpenTelemetry's TraceState would validate the
# tracestate again with the older key grammar this module replaces.
_W3C_KEY = otel_context.create_key("zerver-w3c-trace-context")


@dataclass(frozen=True, slots=True)
class _Held:
    """The ``tracestate`` (and incoming ``traceparent``) that go with ``span_context``."""

    span_context: SpanContext
    tracestate: str
    traceparent: str | None = None


def _held(ctx: OtelContext | None, sc: SpanContext) -> _Held | None:
    """What this module stored for ``sc`` in ``ctx``; ``None`` when ``sc`` came
    from elsewhere (another propagator replaced the span after ours ran)."""
    held = otel_context.get_value(_W3C_KEY, ctx)
    if isinstance(held, _Held) and held.span_context is sc:
        return held
    return None


def _tracestate_of(ctx: OtelContext | None, sc: SpanContext) -> str:
    """The tracestate for ``sc`` in ``ctx``: ours when this module stored it,
    else what another propagator put in ``sc`` (checked and bounded)."""
    held = _held(ctx, sc)
    if held is not None:
        return held.tracestate
    if not sc.trace_state:
        return ""
    return parse_tracestate([sc.trace_state.to_header()]) or ""


class W3CTraceContextPropagator(TextMapPropagator):
    """W3C Trace Context (``traceparent``, ``tracestate``) as an OpenTelemetry
    propagator, with the rules in this module's docstring. It takes the place of
    OpenTelemetry's ``tracecontext`` propagator in zerver's propagation."""

    _FIELDS = frozenset({"traceparent", "tracestate"})

    def extract(
        self,
        carrier: CarrierT,
        context: OtelContext | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> OtelContext:
        if context is None:
            context = OtelContext()
        parent = parse_traceparent(getter.get(carrier, "traceparent"))
        if parent is None:
            return context
        sc = SpanContext(
            parent.trace_id, parent.span_id, is_remote=True, trace_flags=TraceFlags(parent.flags)
        )
        ctx = set_span_in_context(NonRecordingSpan(sc), context)
        # Read only now: a tracestate without a valid traceparent is dropped unread.
        state = parse_tracestate(getter.get(carrier, "tracestate")) or ""
        return otel_context.set_value(_W3C_KEY, _Held(sc, state, parent.header), ctx)

    def inject(
        self,
        carrier: CarrierT,
        context: OtelContext | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        sc = get_current_span(context).get_span_context()
        if not sc.is_valid:
            return
        setter.set(
            carrier, "traceparent", format_traceparent(sc.trace_id, sc.span_id, sc.trace_flags)
        )
        state = _tracestate_of(context, sc)
        if state:
            setter.set(carrier, "tracestate", state)

    @property
    def fields(self) -> set[str]:
        return set(self._FIELDS)


def _global_textmap() -> TextMapPropagator:
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


def _with_w3c(textmap: TextMapPropagator) -> TextMapPropagator:
    """``textmap`` with OpenTelemetry's own ``tracecontext`` propagator replaced
    by :class:`W3CTraceContextPropagator` (a subclass of it is left alone)."""
    if type(textmap) is TraceContextTextMapPropagator:
        return W3CTraceContextPropagator()
    if isinstance(textmap, CompositePropagator):
        # The API offers no public way to list a composite's members.
        members = getattr(textmap, "_propagators", None)
        if isinstance(members, Sequence):
            return CompositePropagator([_with_w3c(p) for p in members])
    return textmap


# (the global propagator, the same with ours in it): rebuilt when the global one
# is replaced; by identity, since a propagator need not be hashable.
_swapped: list[tuple[TextMapPropagator, TextMapPropagator]] = []


def _textmap() -> TextMapPropagator:
    textmap = _global_textmap()
    if _swapped and _swapped[0][0] is textmap:
        return _swapped[0][1]
    ours = _with_w3c(textmap)
    _swapped[:] = [(textmap, ours)]
    return ours


def propagation_fields() -> frozenset[bytes]:
    """Lower-cased header names the configured propagators read, as bytes."""
    return frozenset(f.lower().encode("latin-1") for f in _textmap().fields)


def extract_into(record: RequestRecord, carrier: Mapping[str, list[str]]) -> None:
    """Continue the caller's trace (if valid) and keep its baggage on ``record``."""
    ctx = _textmap().extract(carrier)
    _continue(record, ctx, get_current_span(ctx).get_span_context())


def _continue(record: RequestRecord, ctx: OtelContext, sc: SpanContext) -> None:
    """Make the extracted ``ctx`` (whose span context is ``sc``) the parent of ``record``."""
    if sc.is_valid:
        record.trace_id = sc.trace_id
        record.parent_span_id = sc.span_id
        record.trace_flags = int(sc.trace_flags) & KNOWN_TRACE_FLAGS
        record.parent_remote = True
        record.tracestate = _tracestate_of(ctx, sc) or None
        held = _held(ctx, sc)
        record.traceparent = held.traceparent if held is not None else None
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
    record.links.append((sc.trace_id, sc.span_id, _tracestate_of(ctx, sc)))
    if continue_trace:
        _continue(record, ctx, sc)


def context_for(record: RequestRecord, span_id: int) -> OtelContext:
    """An OpenTelemetry context whose current span is ``span_id`` of the request's
    trace, carrying the request's tracestate and baggage."""
    flags = TraceFlags(record.trace_flags & KNOWN_TRACE_FLAGS)
    sc = SpanContext(record.trace_id, span_id, False, flags)
    ctx = set_span_in_context(NonRecordingSpan(sc))
    if record.tracestate:
        ctx = otel_context.set_value(_W3C_KEY, _Held(sc, record.tracestate), ctx)
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
