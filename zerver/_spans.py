"""Finished spans as plain data: what the trace engine produces and exporters consume.

Ids are integers (128-bit trace id, 64-bit span id) as in the OpenTelemetry
SDK; encoders turn them into hex (OTLP/JSON) or big-endian bytes (protobuf).
Times are Unix-epoch nanoseconds. ``kind`` and ``status_code`` use the OTLP
enum values so encoders copy them as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

__all__ = [
    "FLAG_HAS_REMOTE",
    "FLAG_IS_REMOTE",
    "KIND_NAMES",
    "NO_ATTRIBUTES",
    "STATUS_NAMES",
    "AttrValue",
    "EventTuple",
    "InstrumentationScope",
    "Resource",
    "SpanData",
    "SpanEvent",
    "SpanKind",
    "SpanLink",
    "StatusCode",
    "span_tree",
]

AttrValue = (
    str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]
)


class SpanKind:
    """OTLP ``Span.SpanKind`` values."""

    UNSPECIFIED = 0
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class StatusCode:
    """OTLP ``Status.StatusCode`` values."""

    UNSET = 0
    OK = 1
    ERROR = 2


#: OTLP ``Span.flags`` bits above the W3C trace flags: whether the parent's
#: remote-ness is known, and that the parent is remote (also on links).
FLAG_HAS_REMOTE = 0x100
FLAG_IS_REMOTE = 0x200

#: The OTLP name of each :class:`SpanKind` value (for people: consoles, golden trees).
KIND_NAMES: Mapping[int, str] = MappingProxyType(
    {
        SpanKind.UNSPECIFIED: "UNSPECIFIED",
        SpanKind.INTERNAL: "INTERNAL",
        SpanKind.SERVER: "SERVER",
        SpanKind.CLIENT: "CLIENT",
        SpanKind.PRODUCER: "PRODUCER",
        SpanKind.CONSUMER: "CONSUMER",
    }
)

#: The OTLP name of each :class:`StatusCode` value.
STATUS_NAMES: Mapping[int, str] = MappingProxyType(
    {StatusCode.UNSET: "UNSET", StatusCode.OK: "OK", StatusCode.ERROR: "ERROR"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    """The entity producing spans (``service.name``, ``host.name``, ...)."""

    attributes: Mapping[str, AttrValue] = field(default_factory=dict)
    schema_url: str = ""
    dropped_attributes_count: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class InstrumentationScope:
    """The instrumentation library that made the span."""

    name: str
    version: str = ""
    attributes: Mapping[str, AttrValue] = field(default_factory=dict)
    schema_url: str = ""


#: Attributes of an event that has none (shared, read-only).
NO_ATTRIBUTES: Mapping[str, AttrValue] = MappingProxyType({})

#: How a span holds an event: ``(name, time_ns, attributes, dropped_attributes_count)``.
#: The trace engine builds these as plain tuples (a class instance per event cost
#: more than the rest of the event); :class:`SpanEvent` is the same shape with names.
EventTuple = tuple[str, int, Mapping[str, AttrValue], int]


class SpanEvent(NamedTuple):
    """A timestamped event on a span (an :data:`EventTuple` with field names)."""

    name: str
    time_ns: int
    attributes: Mapping[str, AttrValue] = NO_ATTRIBUTES
    dropped_attributes_count: int = 0


class SpanLink:
    """A link to another span (e.g. a message producer)."""

    __slots__ = (
        "attributes",
        "dropped_attributes_count",
        "flags",
        "span_id",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        *,
        trace_state: str = "",
        attributes: Mapping[str, AttrValue] | None = None,
        flags: int = 0,
        dropped_attributes_count: int = 0,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace_state = trace_state
        self.attributes: Mapping[str, AttrValue] = attributes if attributes is not None else {}
        self.flags = flags
        self.dropped_attributes_count = dropped_attributes_count


class SpanData:
    """One finished span. ``parent_span_id == 0`` means a root span.

    ``flags`` follows OTLP ``Span.flags``: the low 8 bits are the W3C trace
    flags (``0x01`` sampled); bit 8 (``0x100``) says whether the parent's
    remote-ness is known and bit 9 (``0x200``) that the parent is remote.

    ``events`` holds :data:`EventTuple` values (plain tuples from the trace
    engine, :class:`SpanEvent` from elsewhere): read them by unpacking,
    ``for name, time_ns, attributes, dropped in span.events``.
    """

    __slots__ = (
        "attributes",
        "dropped_attributes_count",
        "dropped_events_count",
        "dropped_links_count",
        "end_ns",
        "events",
        "flags",
        "kind",
        "links",
        "name",
        "parent_span_id",
        "resource",
        "scope",
        "span_id",
        "start_ns",
        "status_code",
        "status_message",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        *,
        name: str,
        trace_id: int,
        span_id: int,
        parent_span_id: int = 0,
        kind: int = SpanKind.INTERNAL,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, AttrValue] | None = None,
        events: Sequence[EventTuple] | None = None,
        links: list[SpanLink] | None = None,
        status_code: int = StatusCode.UNSET,
        status_message: str = "",
        trace_state: str = "",
        flags: int = 0x01,
        resource: Resource,
        scope: InstrumentationScope,
        dropped_attributes_count: int = 0,
        dropped_events_count: int = 0,
        dropped_links_count: int = 0,
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.attributes: dict[str, AttrValue] = attributes if attributes is not None else {}
        self.events: list[EventTuple] = list(events) if events is not None else []
        self.links: list[SpanLink] = links if links is not None else []
        self.status_code = status_code
        self.status_message = status_message
        self.trace_state = trace_state
        self.flags = flags
        self.resource = resource
        self.scope = scope
        self.dropped_attributes_count = dropped_attributes_count
        self.dropped_events_count = dropped_events_count
        self.dropped_links_count = dropped_links_count

    def __repr__(self) -> str:
        return (
            f"<SpanData {self.name!r} trace={self.trace_id:032x} span={self.span_id:016x} "
            f"parent={self.parent_span_id:016x}>"
        )


def span_tree(spans: Sequence[SpanData]) -> tuple[list[SpanData], dict[int, list[SpanData]]]:
    """The roots of ``spans`` and each span's children (by span id), both in input order.

    A root is a span whose parent is not among ``spans`` (or that names itself).
    """
    ids = {s.span_id for s in spans}
    roots: list[SpanData] = []
    children: dict[int, list[SpanData]] = {}
    for s in spans:
        parent = s.parent_span_id
        if parent in ids and parent != s.span_id:
            children.setdefault(parent, []).append(s)
        else:
            roots.append(s)
    return roots, children
