"""OTLP/HTTP protobuf encoder built on the official ``opentelemetry-proto`` messages.

Slower than the JSON writer (message construction is Python-level work) but
exact by construction; it is also the reference the JSON output is checked
against. Value mapping matches :mod:`zerver.export._json`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    InstrumentationScope as PbScope,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from ._json import group_by_resource_scope
from ._spans import AttrValue, SpanData

__all__ = ["ProtobufEncoder", "key_values", "to_proto"]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def _clean(s: str) -> str:
    try:
        s.encode()
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode()
    return s


def _any_value(v: object) -> AnyValue | None:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, str):
        return AnyValue(string_value=_clean(v))
    if isinstance(v, int):
        if _INT64_MIN <= v <= _INT64_MAX:
            return AnyValue(int_value=v)
        return AnyValue(string_value=str(v))
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        return AnyValue(bytes_value=bytes(v))
    if isinstance(v, Mapping):
        return AnyValue(kvlist_value=KeyValueList(values=key_values(v)))
    if isinstance(v, Sequence):
        values = []
        for x in v:
            item = _any_value(x)
            values.append(item if item is not None else AnyValue())
        return AnyValue(array_value=ArrayValue(values=values))
    return AnyValue(string_value=_clean(str(v)))


def key_values(attrs: Mapping[str, AttrValue] | Mapping[str, object]) -> list[KeyValue]:
    """Attributes as OTLP ``KeyValue`` messages (values with no encoding left out);
    the metrics encoder uses it too."""
    out = []
    for k, v in attrs.items():
        value = _any_value(v)
        if value is not None:
            out.append(KeyValue(key=_clean(k), value=value))
    return out


def _span(s: SpanData) -> PbSpan:
    pb = PbSpan(
        trace_id=s.trace_id.to_bytes(16, "big"),
        span_id=s.span_id.to_bytes(8, "big"),
        trace_state=_clean(s.trace_state),
        name=_clean(s.name),
        kind=s.kind,  # type: ignore[arg-type]
        start_time_unix_nano=s.start_ns,
        end_time_unix_nano=s.end_ns,
        attributes=key_values(s.attributes),
        dropped_attributes_count=s.dropped_attributes_count,
        dropped_events_count=s.dropped_events_count,
        dropped_links_count=s.dropped_links_count,
        flags=s.flags,
        status=Status(code=s.status_code, message=_clean(s.status_message)),  # type: ignore[arg-type]
    )
    if s.parent_span_id:
        pb.parent_span_id = s.parent_span_id.to_bytes(8, "big")
    for name, time_ns, attributes, dropped in s.events:
        pb.events.append(
            PbSpan.Event(
                time_unix_nano=time_ns,
                name=_clean(name),
                attributes=key_values(attributes),
                dropped_attributes_count=dropped,
            )
        )
    for link in s.links:
        pb.links.append(
            PbSpan.Link(
                trace_id=link.trace_id.to_bytes(16, "big"),
                span_id=link.span_id.to_bytes(8, "big"),
                trace_state=_clean(link.trace_state),
                attributes=key_values(link.attributes),
                dropped_attributes_count=link.dropped_attributes_count,
                flags=link.flags,
            )
        )
    return pb


def to_proto(
    spans: Sequence[SpanData], invalid: list[int] | None = None
) -> ExportTraceServiceRequest:
    """The official ``ExportTraceServiceRequest`` message for ``spans``.

    Spans that cannot be represented (ids or times out of range) are skipped
    and, when ``invalid`` is given, counted in ``invalid[0]``.
    """
    request = ExportTraceServiceRequest()
    for res, scopes in group_by_resource_scope(spans):
        rs = ResourceSpans(
            resource=PbResource(
                attributes=key_values(res.attributes),
                dropped_attributes_count=res.dropped_attributes_count,
            ),
            schema_url=res.schema_url,
        )
        for scope, members in scopes:
            ss = ScopeSpans(
                scope=PbScope(
                    name=scope.name,
                    version=scope.version,
                    attributes=key_values(scope.attributes),
                ),
                schema_url=scope.schema_url,
            )
            for s in members:
                try:
                    ss.spans.append(_span(s))
                except (OverflowError, TypeError, ValueError, AttributeError):
                    if invalid is not None:
                        invalid[0] += 1
            rs.scope_spans.append(ss)
        request.resource_spans.append(rs)
    return request


class ProtobufEncoder:
    """Encodes batches as a binary OTLP ``ExportTraceServiceRequest``."""

    content_type = "application/x-protobuf"

    __slots__ = ("_invalid",)

    def __init__(self) -> None:
        self._invalid = [0]

    @property
    def invalid_spans(self) -> int:
        """Spans skipped because they could not be encoded (cumulative)."""
        return self._invalid[0]

    def encode(self, spans: Sequence[SpanData]) -> bytes:
        """The request body for ``spans``."""
        return cast(bytes, to_proto(spans, self._invalid).SerializeToString())
