"""Span limits (``OTEL_*_LIMIT``): what is cut is counted, and the official schema reads it."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from zerver import App, Context, DbGet, Done, Need, Response, Slot, load_settings, step
from zerver.export import JsonEncoder, ProtobufEncoder, ProtobufWireEncoder
from zerver.export._spans import InstrumentationScope, Resource, SpanData, SpanLimits, SpanLink
from zerver.testing import AppClient, FakeInterpreter, InMemorySpanSink

pytestmark = pytest.mark.anyio

ROW: Slot[Any] = Slot("row")


def _decoded(spans: list[SpanData]) -> list[ExportTraceServiceRequest]:
    """The spans through every encoder, read back with the official classes."""
    out = [
        ExportTraceServiceRequest.FromString(ProtobufWireEncoder().encode(spans)),
        ExportTraceServiceRequest.FromString(ProtobufEncoder().encode(spans)),
    ]
    msg = ExportTraceServiceRequest()
    json_format.Parse(JsonEncoder().encode(spans), msg)
    out.append(msg)
    return out


def _pb_spans(msg: ExportTraceServiceRequest) -> dict[str, Any]:
    return {s.name: s for rs in msg.resource_spans for ss in rs.scope_spans for s in ss.spans}


async def _trace(env: dict[str, str]) -> list[SpanData]:
    app = App("limits", settings=load_settings(env))
    fake = FakeInterpreter(app.clock)
    fake.on("db.get post", result={"id": 1})
    app.interpreter("db", fake)

    @step(writes=[ROW])
    def load(ctx: Context) -> Need:
        return Need([DbGet(table="post", key=ctx.request.path, slot=ROW)])

    @step(reads=[ROW])
    def show(ctx: Context) -> Done:
        return Done(Response.json({}))

    app.get("/posts/{a}/{b}/{c}", load, show)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with AppClient(app) as client:
        assert (await client.get("/posts/aaaaaaaa/bbbbbbbb/cccccccc?q=longvalue")).status == 200
    return list(sink.spans)


async def test_defaults_cut_nothing() -> None:
    for span in await _trace({}):
        assert span.dropped_attributes_count == 0
        assert span.dropped_events_count == 0
        assert span.dropped_links_count == 0


async def test_limits_cut_and_count_on_the_wire() -> None:
    env = {
        "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "5",
        "OTEL_SPAN_EVENT_COUNT_LIMIT": "2",
        "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "4",
    }
    unlimited = {s.name: s for s in await _trace({})}
    spans = await _trace(env)
    for span in spans:
        full = unlimited[span.name]
        assert len(span.attributes) == min(5, len(full.attributes))
        assert span.dropped_attributes_count == max(0, len(full.attributes) - 5)
        # The first attributes are kept, as in the OpenTelemetry SDK.
        assert list(span.attributes) == list(full.attributes)[:5]
        for value in span.attributes.values():
            if isinstance(value, str):
                assert len(value) <= 4
        assert len(span.events) == min(2, len(full.events))
        assert span.dropped_events_count == max(0, len(full.events) - 2)
        # The latest events are kept.
        assert [e[0] for e in span.events] == [e[0] for e in full.events][-2:]
    effect = next(s for s in spans if s.name == "db.get post")
    assert effect.dropped_events_count > 0
    for msg in _decoded(spans):
        by_name = _pb_spans(msg)
        for span in spans:
            pb = by_name[span.name]
            assert pb.dropped_attributes_count == span.dropped_attributes_count
            assert pb.dropped_events_count == span.dropped_events_count
            assert len(pb.attributes) == len(span.attributes)
            assert len(pb.events) == len(span.events)


async def test_the_general_count_limit_is_the_fallback() -> None:
    spans = await _trace({"OTEL_ATTRIBUTE_COUNT_LIMIT": "3"})
    root = next(s for s in spans if s.parent_span_id == 0)
    assert len(root.attributes) == 3 and root.dropped_attributes_count > 0
    # The span-specific limit wins over it.
    spans = await _trace(
        {"OTEL_ATTRIBUTE_COUNT_LIMIT": "3", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "6"}
    )
    root = next(s for s in spans if s.parent_span_id == 0)
    assert len(root.attributes) == 6


def _span(**kw: Any) -> SpanData:
    return SpanData(
        name="s",
        trace_id=1,
        span_id=2,
        start_ns=1,
        end_ns=2,
        resource=Resource(attributes={"service.name": "x"}),
        scope=InstrumentationScope(name="t"),
        **kw,
    )


def test_links_and_their_attributes_are_limited() -> None:
    links = [SpanLink(1, i + 10, attributes={"a": "x", "b": "yyyyyy", "c": 1}) for i in range(4)]
    span = _span(links=links, attributes={"k": ["long-string", "s"], "n": 3})
    SpanLimits(links=2, link_attributes=2, value_length=3).apply([span])
    assert [link.span_id for link in span.links] == [12, 13]
    assert span.dropped_links_count == 2
    for link in span.links:
        assert dict(link.attributes) == {"a": "x", "b": "yyy"}
        assert link.dropped_attributes_count == 1
    assert span.attributes == {"k": ["lon", "s"], "n": 3}
    for msg in _decoded([span]):
        pb = _pb_spans(msg)["s"]
        assert pb.dropped_links_count == 2
        assert [link.dropped_attributes_count for link in pb.links] == [1, 1]


def test_event_attributes_are_limited_and_shared_maps_untouched() -> None:
    from types import MappingProxyType

    shared = MappingProxyType({"a": 1, "b": 2, "c": 3})
    span = _span(events=[("e", 5, shared, 0)])
    SpanLimits(event_attributes=1).apply([span])
    assert span.events == [("e", 5, {"a": 1}, 2)]
    assert dict(shared) == {"a": 1, "b": 2, "c": 3}
    for msg in _decoded([span]):
        assert _pb_spans(msg)["s"].events[0].dropped_attributes_count == 2


def test_zero_limits_drop_everything_and_count_it() -> None:
    span = _span(attributes={"a": 1, "b": 2}, events=[("e", 5, {}, 0)] * 3)
    SpanLimits(attributes=0, events=0).apply([span])
    assert span.attributes == {} and span.events == []
    assert span.dropped_attributes_count == 2 and span.dropped_events_count == 3


@pytest.mark.parametrize(
    "var",
    [
        "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
        "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
        "OTEL_SPAN_EVENT_COUNT_LIMIT",
        "OTEL_SPAN_LINK_COUNT_LIMIT",
        "OTEL_ATTRIBUTE_COUNT_LIMIT",
    ],
)
@pytest.mark.parametrize("bad", ["-1", "many"])
def test_bad_limits_stop_start_up(var: str, bad: str) -> None:
    from zerver import ConfigError

    with pytest.raises(ConfigError, match=var):
        load_settings({var: bad})
