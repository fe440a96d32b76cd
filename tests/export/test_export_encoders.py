from __future__ import annotations

import json
import math

import orjson
from export_helpers import RES, SCOPE, T0, hex_ids_to_base64, make_span, spans
from google.protobuf import json_format, text_format  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope

from zerver.export import (
    JsonEncoder,
    ProtobufEncoder,
    ProtobufWireEncoder,
    span_from_readable,
    span_to_readable,
)
from zerver.export._protobuf import to_proto
from zerver.export._spans import InstrumentationScope, Resource, SpanData, SpanLink


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    obj = hex_ids_to_base64(json.loads(body))
    message = ExportTraceServiceRequest()
    json_format.Parse(json.dumps(obj), message, ignore_unknown_fields=False)
    return message


def assert_same(a: ExportTraceServiceRequest, b: ExportTraceServiceRequest) -> None:
    # Serialised comparison treats NaN == NaN; the text dump makes a failure readable.
    if a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True):
        assert text_format.MessageToString(a) == text_format.MessageToString(b)
        raise AssertionError("messages differ only in float bit patterns")


def official(batch: list[SpanData]) -> ExportTraceServiceRequest:
    """The official encoder on equivalent SDK spans (shared resource/scope objects)."""
    sdk_res: dict[int, SdkResource] = {}
    sdk_scope: dict[int, SdkScope] = {}
    readable = []
    for s in batch:
        r = sdk_res.setdefault(
            id(s.resource),
            SdkResource(dict(s.resource.attributes), s.resource.schema_url or None),
        )
        sc = sdk_scope.setdefault(
            id(s.scope),
            SdkScope(
                s.scope.name,
                s.scope.version or None,
                s.scope.schema_url or None,
                dict(s.scope.attributes),
            ),
        )
        readable.append(span_to_readable(s, resource=r, scope=sc))
    return encode_spans(readable)


# -- shape of the JSON --------------------------------------------------------


def test_json_shape_is_otlp() -> None:
    span = make_span(
        0,
        trace_id=0x5B8EFFF798038103D269B633813FC60C,
        span_id=0xEEE19B7EC3C1B174,
        parent_span_id=0xEEE19B7EC3C1B173,
        trace_state="congo=t61",
        flags=0x301,
        status_code=2,
        status_message="boom",
        attributes={"n": 9007199254740993, "tags": ["a", "b"], "ok": False, "x": 0.5},
        links=[SpanLink(1, 2, attributes={"k": "v"}, flags=0x100)],
        dropped_events_count=3,
    )
    doc = orjson.loads(JsonEncoder().encode([span]))
    rs = doc["resourceSpans"][0]
    assert rs["resource"]["attributes"][0] == {
        "key": "service.name",
        "value": {"stringValue": "blog"},
    }
    ss = rs["scopeSpans"][0]
    assert ss["scope"] == {"name": "zerver", "version": "0.1.0"}
    out = ss["spans"][0]
    assert out["traceId"] == "5b8efff798038103d269b633813fc60c"
    assert out["spanId"] == "eee19b7ec3c1b174"
    assert out["parentSpanId"] == "eee19b7ec3c1b173"
    assert out["traceState"] == "congo=t61"
    assert out["flags"] == 0x301
    assert out["kind"] == 3
    assert out["startTimeUnixNano"] == str(T0)
    assert out["endTimeUnixNano"] == str(T0 + 250_000)
    assert out["attributes"] == [
        {"key": "n", "value": {"intValue": "9007199254740993"}},
        {
            "key": "tags",
            "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}},
        },
        {"key": "ok", "value": {"boolValue": False}},
        {"key": "x", "value": {"doubleValue": 0.5}},
    ]
    assert out["events"] == [
        {
            "timeUnixNano": str(T0 + 100),
            "name": "zerver.job.enqueued",
            "attributes": [{"key": "job.queue", "value": {"stringValue": "effects"}}],
        }
    ]
    assert out["links"] == [
        {
            "traceId": "00000000000000000000000000000001",
            "spanId": "0000000000000002",
            "attributes": [{"key": "k", "value": {"stringValue": "v"}}],
            "flags": 256,
        }
    ]
    assert out["droppedEventsCount"] == 3
    assert out["status"] == {"message": "boom", "code": 2}


def test_json_groups_by_resource_then_scope_keeping_order() -> None:
    other_res = Resource(attributes={"service.name": "b"})
    other_scope = InstrumentationScope(name="user")
    batch = [
        make_span(0),
        make_span(1, resource=other_res),
        make_span(2, scope=other_scope),
        make_span(3),
    ]
    doc = orjson.loads(JsonEncoder().encode(batch))
    shape = [
        [
            (ss["scope"]["name"], [s["startTimeUnixNano"] for s in ss["spans"]])
            for ss in rs["scopeSpans"]
        ]
        for rs in doc["resourceSpans"]
    ]
    t = [str(make_span(i).start_ns) for i in range(4)]
    assert shape == [[("zerver", [t[0], t[3]]), ("user", [t[2]])], [("zerver", [t[1]])]]


def test_empty_batch_and_empty_attribute_maps() -> None:
    assert orjson.loads(JsonEncoder().encode([])) == {"resourceSpans": []}
    span = make_span(
        0, attributes={}, events=[], resource=Resource(), scope=InstrumentationScope(name="")
    )
    assert_same(parse_json(JsonEncoder().encode([span])), to_proto([span]))


def test_values_otlp_cannot_carry_are_mapped_not_raised() -> None:
    attrs = {
        "big": 1 << 70,
        "none": None,
        "nan": math.nan,
        "inf": -math.inf,
        "obj": object.__new__(type("Thing", (), {"__str__": lambda self: "thing"})),
        "bytes": b"\x00\x01",
        "nested": {"a": 1},
        "esc": 'quote" back\\ nl\n \x01 \u2028 é',
    }
    span = make_span(0, attributes=attrs)
    body = JsonEncoder().encode([span])
    assert_same(parse_json(body), to_proto([span]))
    wire = ExportTraceServiceRequest.FromString(ProtobufWireEncoder().encode([span]))
    assert_same(wire, to_proto([span]))
    values = {
        a["key"]: a["value"]
        for a in orjson.loads(body)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"]
    }
    assert values["big"] == {"stringValue": str(1 << 70)}
    assert "none" not in values
    assert values["nan"] == {"doubleValue": "NaN"}
    assert values["inf"] == {"doubleValue": "-Infinity"}
    assert values["obj"] == {"stringValue": "thing"}


def test_lone_surrogates_are_replaced() -> None:
    span = make_span(0, name="bad \ud800 name")
    body = JsonEncoder().encode([span])
    assert b"bad ? name" in body
    ProtobufEncoder().encode([span])  # no exception
    parsed = ExportTraceServiceRequest.FromString(ProtobufWireEncoder().encode([span]))
    assert_same(parsed, to_proto([span]))


def test_unencodable_span_is_skipped_and_counted() -> None:
    enc = JsonEncoder()
    pb = ProtobufEncoder()
    bad = make_span(1, trace_id=1 << 130)
    batch = [make_span(0), bad, make_span(2)]
    doc = orjson.loads(enc.encode(batch))
    assert len(doc["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 2
    assert enc.invalid_spans == 1
    assert (
        len(
            ExportTraceServiceRequest.FromString(pb.encode(batch))
            .resource_spans[0]
            .scope_spans[0]
            .spans
        )
        == 2
    )
    assert pb.invalid_spans == 1
    only_bad = orjson.loads(enc.encode([bad]))
    assert only_bad["resourceSpans"][0]["scopeSpans"][0]["spans"] == []
    wire = ProtobufWireEncoder()
    for odd in (
        bad,
        make_span(3, start_ns=-1),
        make_span(4, end_ns=1 << 64),
        make_span(5, dropped_events_count=1 << 32),
        make_span(6, flags=1 << 32),
        make_span(7, kind=1 << 31),
    ):
        parsed = ExportTraceServiceRequest.FromString(wire.encode([make_span(0), odd]))
        assert len(parsed.resource_spans[0].scope_spans[0].spans) == 1
    assert wire.invalid_spans == 6
    odd_enums = [make_span(8, kind=-1, status_code=-2)]
    parsed = ExportTraceServiceRequest.FromString(wire.encode(odd_enums))
    assert_same(parsed, to_proto(odd_enums))


def test_caches_stay_bounded_and_correct() -> None:
    enc = JsonEncoder(cache_size=4)
    wire = ProtobufWireEncoder(cache_size=4)
    batch = [
        make_span(i, attributes={f"k{i % 7}": f"v{i}", "n": i, f"f{i % 5}": i / 3}, name=f"n{i}")
        for i in range(50)
    ]
    for _ in range(2):
        assert_same(parse_json(enc.encode(batch)), to_proto(batch))
        assert_same(ExportTraceServiceRequest.FromString(wire.encode(batch)), to_proto(batch))
    assert max(len(wire._kv), len(wire._keys), len(wire._names)) <= 4


def test_cached_sequence_and_bool_fragments_never_mix_equal_values() -> None:
    # (1,) == (True,) == (1.0,) as dict keys; each must keep its own encoding when
    # one encoder meets them in turn under the same key, cached or not.
    values: list[object] = [
        ("a", "b"),
        (1,),
        (True,),
        (1.0,),
        ("1",),
        True,
        1,
        ([1],),  # unhashable: encoded, never cached
        ("a", "b"),
        (True,),
        ("1",),
        (),
    ]
    enc = JsonEncoder()
    for _ in range(2):
        for v in values:
            span = make_span(0, attributes={"k": v})
            assert parse_json(enc.encode([span])) == parse_json(JsonEncoder().encode([span]))
    with_bool = [make_span(0, attributes={"k": True}), make_span(0, attributes={"k": False})]
    assert_same(parse_json(enc.encode(with_bool)), to_proto(with_bool))


# -- conformance with the official schema and encoder ------------------------

conformance = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@conformance
@given(st.lists(spans(), min_size=1, max_size=5))
def test_json_parses_with_official_schema_and_equals_protobuf_path(batch: list[SpanData]) -> None:
    assert_same(parse_json(JsonEncoder().encode(batch)), to_proto(batch))


@conformance
@given(st.lists(spans(), min_size=1, max_size=5))
def test_protobuf_output_parses_with_official_types(batch: list[SpanData]) -> None:
    body = ProtobufEncoder().encode(batch)
    parsed = ExportTraceServiceRequest.FromString(body)
    assert_same(parsed, to_proto(batch))
    assert sum(len(ss.spans) for rs in parsed.resource_spans for ss in rs.scope_spans) == len(batch)


@conformance
@given(st.lists(spans(), min_size=1, max_size=5))
def test_protobuf_wire_writer_equals_the_official_messages(batch: list[SpanData]) -> None:
    wire = ProtobufWireEncoder()
    parsed = ExportTraceServiceRequest.FromString(wire.encode(batch))
    assert_same(parsed, to_proto(batch))
    assert wire.invalid_spans == 0


@conformance
@given(st.lists(spans(sdk_compatible=True), min_size=1, max_size=5))
def test_protobuf_wire_writer_equals_official_encoder(batch: list[SpanData]) -> None:
    assert_same(
        ExportTraceServiceRequest.FromString(ProtobufWireEncoder().encode(batch)), official(batch)
    )


@conformance
@given(st.lists(spans(sdk_compatible=True), min_size=1, max_size=5))
def test_json_equals_official_encoder_field_by_field(batch: list[SpanData]) -> None:
    assert_same(parse_json(JsonEncoder().encode(batch)), official(batch))


@conformance
@given(spans(sdk_compatible=True))
def test_readable_span_round_trip(span: SpanData) -> None:
    readable = span_to_readable(span)
    back = span_from_readable(readable)
    # The SDK keeps the "has is-remote" bit implicit; the conversion sets it.
    assert back.flags == span.flags | 0x100
    back.flags = span.flags
    for link in back.links:
        link.flags &= ~0xFF
    assert_same(to_proto([back]), to_proto([span]))


def test_realistic_batch_equals_official() -> None:
    batch = [make_span(i, flags=0x100) for i in range(20)]
    assert_same(parse_json(JsonEncoder().encode(batch)), official(batch))
    wire = ProtobufWireEncoder().encode(batch)
    assert_same(ExportTraceServiceRequest.FromString(wire), official(batch))
    assert RES is batch[0].resource and SCOPE is batch[0].scope
