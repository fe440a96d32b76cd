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
from typing import TYPE_CHECKING, NamedTuple

from zerver.core._attributes import AttrValue

if TYPE_CHECKING:
    from zerver._config import Settings

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
    "SpanLimits",
    "SpanLink",
    "StatusCode",
    "span_tree",
]


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


class SpanLimits:
    """The OpenTelemetry span limits, applied to finished spans; what is cut is counted.

    As the OpenTelemetry SDK reads them: ``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT`` (else
    ``OTEL_ATTRIBUTE_COUNT_LIMIT``, else 128) attributes per span, the first ones
    kept; ``OTEL_SPAN_EVENT_COUNT_LIMIT`` and ``OTEL_SPAN_LINK_COUNT_LIMIT`` (128)
    events and links, the latest kept; ``OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT`` and
    ``OTEL_LINK_ATTRIBUTE_COUNT_LIMIT`` (else the attribute count limit) per
    event and link; ``OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT`` (else
    ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``, else none) characters per string value,
    strings in arrays included, on spans, events and links. Cut attributes, events
    and links are counted in ``droppedAttributesCount``, ``droppedEventsCount`` and
    ``droppedLinksCount``; a truncated value is not counted (as in the SDK).

    :meth:`apply` costs three length checks per span when nothing is over.
    """

    __slots__ = (
        "attributes",
        "event_attributes",
        "events",
        "link_attributes",
        "links",
        "value_length",
    )

    def __init__(
        self,
        *,
        attributes: int = 128,
        events: int = 128,
        links: int = 128,
        event_attributes: int | None = None,
        link_attributes: int | None = None,
        value_length: int | None = None,
    ) -> None:
        for name, value in (
            ("attributes", attributes),
            ("events", events),
            ("links", links),
            ("event_attributes", event_attributes),
            ("link_attributes", link_attributes),
            ("value_length", value_length),
        ):
            if value is not None and value < 0:
                raise ValueError(f"span limit {name} must be >= 0, got {value}")
        self.attributes = attributes
        self.events = events
        self.links = links
        self.event_attributes = event_attributes if event_attributes is not None else attributes
        self.link_attributes = link_attributes if link_attributes is not None else attributes
        self.value_length = value_length

    @classmethod
    def from_settings(cls, settings: Settings) -> SpanLimits:
        """The limits the ``OTEL_*_LIMIT`` settings name, with their fallbacks."""
        count = settings.span_attribute_count_limit
        if count is None:
            count = settings.attribute_count_limit
        length = settings.span_attribute_value_length_limit
        if length is None:
            length = settings.attribute_value_length_limit
        event_attrs = settings.event_attribute_count_limit
        link_attrs = settings.link_attribute_count_limit
        return cls(
            attributes=count,
            events=settings.span_event_count_limit,
            links=settings.span_link_count_limit,
            event_attributes=event_attrs if event_attrs is not None else count,
            link_attributes=link_attrs if link_attrs is not None else count,
            value_length=length,
        )

    def apply(self, spans: Sequence[SpanData]) -> None:
        """Cut each span of ``spans`` to the limits, in place, counting what was cut."""
        amax, emax, lmax = self.attributes, self.events, self.links
        # Events and links made here carry a handful of attributes each: their own
        # limit is only checked when it is set below that.
        deep = self.value_length is not None or min(self.event_attributes, self.link_attributes) < 8
        for s in spans:
            if deep or len(s.attributes) > amax or len(s.events) > emax or len(s.links) > lmax:
                self._limit(s)

    def _limit(self, s: SpanData) -> None:
        attrs, cut = self._attrs(s.attributes, self.attributes)
        if cut or attrs is not s.attributes:
            s.attributes = dict(attrs)
            s.dropped_attributes_count += cut
        events = s.events
        if len(events) > self.events:
            over = len(events) - self.events
            events = events[over:]  # the latest kept, as the SDK's bounded list does
            s.dropped_events_count += over
        limited: list[EventTuple] = []
        for name, time_ns, eattrs, edropped in events:
            kept, ecut = self._attrs(eattrs, self.event_attributes)
            limited.append((name, time_ns, kept, edropped + ecut))
        s.events = limited
        links = s.links
        if len(links) > self.links:
            over = len(links) - self.links
            links = links[over:]
            s.dropped_links_count += over
        for link in links:
            kept, lcut = self._attrs(link.attributes, self.link_attributes)
            if lcut or kept is not link.attributes:
                link.attributes = kept
                link.dropped_attributes_count += lcut
        s.links = list(links)

    def _attrs(
        self, attrs: Mapping[str, AttrValue], limit: int
    ) -> tuple[Mapping[str, AttrValue], int]:
        """``attrs`` within ``limit`` (the first kept) and values truncated; and how many
        were cut. The same mapping when nothing changes (shared maps stay shared)."""
        cut = len(attrs) - limit if len(attrs) > limit else 0
        length = self.value_length
        if not cut and (length is None or not attrs):
            return attrs, 0
        out: dict[str, AttrValue] = {}
        changed = bool(cut)
        for i, (key, value) in enumerate(attrs.items()):
            if i >= limit:
                break
            if length is not None:
                short = _truncated(value, length)
                if short is not None:
                    out[key] = short
                    changed = True
                    continue
            out[key] = value
        return (out if changed else attrs), cut


def _truncated(value: AttrValue, length: int) -> AttrValue | None:
    """``value`` with its strings cut to ``length`` characters; None if none was longer."""
    if isinstance(value, str):
        return value[:length] if len(value) > length else None
    if isinstance(value, list | tuple) and any(
        isinstance(v, str) and len(v) > length for v in value
    ):
        return [str(v)[:length] for v in value]
    return None
