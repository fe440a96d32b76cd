"""The load test's receiver counts OTLP/JSON spans without parsing the body: it must
count exactly what a full parse counts, or decline and let the full parse count."""

from __future__ import annotations

import urllib.request
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest._receiver import SpanReceiver, SpanTally, _count_json, scan_json_spans
from zerver.export import JsonEncoder
from zerver.export._spans import InstrumentationScope, Resource, SpanData, SpanKind, SpanLink

RES = Resource(attributes={"service.name": "svc"})
SCOPE = InstrumentationScope(name="zerver", version="1")

# Text that looks like the structure the scan looks for: inside a JSON string its
# quotes are escaped, so none of it may be taken for a span or a route.
LOOKALIKES = [
    '{"traceId":"' + "ab" * 16 + '","spanId":"' + "cd" * 8 + '","name":"x","kind":2,',
    '"startTimeUnixNano":"1"',
    '{"key":"http.route","value":{"stringValue":"/fake"}}',
    '"events":[',
    "\\",
    '"',
    "é ünï \u2603",
]
texts = st.one_of(st.sampled_from(LOOKALIKES), st.text(max_size=12))
route_keys = st.sampled_from(["http.route", "url.path", "http.target", "other"])
values: st.SearchStrategy[Any] = st.one_of(
    texts,
    st.integers(-5, 5),
    st.booleans(),
    st.lists(texts, max_size=2).map(tuple),
    st.dictionaries(route_keys, texts, max_size=2),
)
attributes: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.dictionaries(st.one_of(route_keys, texts), values, max_size=4),
    st.dictionaries(route_keys, st.one_of(texts, st.integers(0, 2)), max_size=3),  # flat
)


@st.composite
def spans(draw: st.DrawFn) -> list[SpanData]:
    out: list[SpanData] = []
    resources = [RES, Resource(attributes={"http.route": "/resource"})]
    scopes = [SCOPE, InstrumentationScope(name="other", attributes={"url.path": "/scope"})]
    for i in range(draw(st.integers(0, 8))):
        events = [("e", 5, draw(attributes), 0) for _ in range(draw(st.sampled_from([0, 0, 0, 1])))]
        links = [
            SpanLink(
                draw(st.integers(1, 3)),
                draw(st.integers(1, 3)),
                trace_state=draw(st.sampled_from(["", "k=v"])),
                attributes=draw(attributes),
                flags=draw(st.sampled_from([0, 257])),
            )
            for _ in range(draw(st.sampled_from([0, 0, 0, 1])))
        ]
        out.append(
            SpanData(
                name=draw(texts),
                trace_id=draw(st.integers(1, 3)),
                span_id=i + 1,
                parent_span_id=draw(st.sampled_from([0, 0, 1, 7])),
                kind=draw(st.sampled_from([2, 2, 2, 0, 1, 3, 4, 5])),
                start_ns=1,
                end_ns=2,
                attributes=draw(attributes),
                events=events,
                links=links,
                status_code=draw(st.sampled_from([0, 2])),
                trace_state=draw(st.sampled_from(["", "a=b"])),
                flags=draw(st.sampled_from([0, 1, 257])),
                resource=draw(st.sampled_from(resources)),
                scope=draw(st.sampled_from(scopes)),
            )
        )
    return out


class RowTally(SpanTally):
    """Keeps the rows the tally would count."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str | None]] = []

    def _add(self, rows: list[tuple[str, str | None]]) -> None:
        self.rows.extend(rows)


def parsed_rows(body: bytes) -> list[tuple[str, str | None]]:
    """What the tally counts from the fully parsed document."""
    tally = RowTally()
    tally.add_json(orjson.loads(body))
    return tally.rows


@settings(max_examples=300, deadline=None)
@given(spans())
def test_scan_counts_what_a_full_parse_counts_or_declines(batch: list[SpanData]) -> None:
    body = JsonEncoder().encode(batch)
    rows = scan_json_spans(body)
    if rows is not None:
        assert rows == parsed_rows(body)
    _doc, count = _count_json(body)
    assert count == len(batch)


def server_root(trace_id: int, **attrs: object) -> SpanData:
    return SpanData(
        name="GET /x",
        trace_id=trace_id,
        span_id=trace_id * 16,
        kind=SpanKind.SERVER,
        start_ns=1,
        end_ns=2,
        attributes=dict(attrs),  # type: ignore[arg-type]
        resource=RES,
        scope=SCOPE,
    )


def child(trace_id: int) -> SpanData:
    return SpanData(
        name="db.get blog_post",
        trace_id=trace_id,
        span_id=trace_id * 16 + 1,
        parent_span_id=trace_id * 16,
        kind=SpanKind.CLIENT,
        start_ns=1,
        end_ns=2,
        attributes={"db.system": "sqlite", "job.run_active_ms": 0.25},
        events=[("zerver.job.taken", 3, {"job.worker_id": 1}, 0)],
        resource=RES,
        scope=SCOPE,
    )


def test_scan_reads_zerver_traces_without_parsing() -> None:
    batch = [
        server_root(1, **{"url.path": "/p", "http.route": "/blogs/posts/{id}"}),
        child(1),
        server_root(2, **{"url.path": "/items/42"}),
        child(2),
        server_root(3, **{"http.route": "", "http.target": '/t?q=\\"é'}),
        server_root(4),
        child(5),
    ]
    body = JsonEncoder().encode(batch)
    rows = scan_json_spans(body)
    assert rows == [
        (f"{1:032x}", "/blogs/posts/{id}"),
        (f"{1:032x}", None),
        (f"{2:032x}", "/items/42"),
        (f"{2:032x}", None),
        (f"{3:032x}", '/t?q=\\"é'),
        (f"{4:032x}", "GET /x"),
        (f"{5:032x}", None),
    ]
    assert rows == parsed_rows(body)


def test_scan_declines_what_it_cannot_read_exactly() -> None:
    trace = "ab" * 16
    reordered = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {"spanId": "01" * 8, "traceId": trace, "name": "a", "kind": 2},
                            {"traceId": trace, "spanId": "02" * 8, "name": "b", "kind": 1},
                        ]
                    }
                ]
            }
        ]
    }
    for span in reordered["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        span["startTimeUnixNano"] = "1"
    body = orjson.dumps(reordered)
    assert scan_json_spans(body) is None  # the first span's members are in another order
    _doc, count = _count_json(body)
    assert count == 2
    assert parsed_rows(body) == [(trace, "a"), (trace, None)]
    # A route key whose value is not a string: the full parse decides.
    odd = JsonEncoder().encode([server_root(1, **{"http.route": 5, "url.path": "/u"})])
    assert scan_json_spans(odd) is None
    assert parsed_rows(odd) == [(f"{1:032x}", "/u")]
    assert _count_json(odd)[1] == 1
    assert scan_json_spans(b"") is None
    assert scan_json_spans(b'{"resourceSpans":[') is None


def test_receiver_tallies_json_exports_by_scan_and_by_parse() -> None:
    scanned = JsonEncoder().encode([server_root(1, **{"http.route": "/r"}), child(1), child(2)])
    reordered = orjson.dumps(
        {
            "resourceSpans": [
                {
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "spanId": "01" * 8,
                                    "traceId": f"{3:032x}",
                                    "name": "GET /z",
                                    "kind": 2,
                                    "startTimeUnixNano": "1",
                                }
                            ]
                        }
                    ]
                }
            ]
        }
    )
    with SpanReceiver() as receiver:
        for body in (scanned, reordered):
            req = urllib.request.Request(
                receiver.traces_endpoint,
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
        assert receiver.wait_quiet(0.05, 10)
        snap = receiver.snapshot()
    assert snap.spans == 4
    assert snap.root_server_spans == 2
    assert snap.export_requests == 2
    assert snap.decode_errors == snap.rejected_requests == 0
    assert snap.by_root["/r"].roots == 1 and snap.by_root["/r"].spans == 2
    assert snap.by_root["GET /z"].roots == 1
    assert snap.by_root[""].spans == 1  # trace 2's root never arrived
