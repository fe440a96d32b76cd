"""The hand-written aggregation against the OpenTelemetry metrics SDK, same measurements."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from zerver.trace._aggregate import OVERFLOW_ATTRIBUTES, Aggregator

BOUNDS = (0.001, 0.01, 0.1, 1.0)
ATTR_SETS: list[dict[str, str | int]] = [
    {"http.route": "/a", "http.response.status_code": 200},
    {"http.route": "/b", "http.response.status_code": 200},
    {"http.route": "/a", "http.response.status_code": 500},
]

# (which attribute set, value, span id or 0 for an unsampled measurement)
measurement = st.tuples(
    st.integers(0, len(ATTR_SETS) - 1),
    st.one_of(st.sampled_from(BOUNDS), st.floats(0, 5, allow_nan=False)),
    st.one_of(st.just(0), st.integers(1, 2**64 - 1)),
)
TRACE = 0x0AF7651916CD43DD8448EB211C80319C


def _ctx(span_id: int) -> Context:
    if not span_id:
        return Context()
    sc = SpanContext(TRACE, span_id, False, TraceFlags(TraceFlags.SAMPLED))
    return set_span_in_context(NonRecordingSpan(sc))


def _points(data: MetricsData | None, name: str) -> dict[tuple[Any, ...], Any]:
    assert data is not None
    out = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    for p in m.data.data_points:
                        out[tuple(sorted((p.attributes or {}).items()))] = p
    return out


def _sdk() -> tuple[Any, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader], exemplar_filter=TraceBasedExemplarFilter())
    return provider.get_meter("zerver"), reader


@settings(max_examples=60, deadline=None)
@given(st.lists(measurement, max_size=80))
def test_histograms_match_the_sdk(ms: list[tuple[int, float, int]]) -> None:
    meter, reader = _sdk()
    sdk = meter.create_histogram("h", "s", "d", explicit_bucket_boundaries_advisory=BOUNDS)
    agg = Aggregator()
    ours = agg.histogram("h", "s", "d", BOUNDS)
    for which, value, span in ms:
        sdk.record(value, ATTR_SETS[which], _ctx(span))
        ours.record(value, ATTR_SETS[which], TRACE if span else 0, span)
    got = agg.collect()
    if not ms:
        assert got is None
        return
    want = _points(reader.get_metrics_data(), "h")
    have = _points(got, "h")
    assert have.keys() == want.keys()
    for key, w in want.items():
        h = have[key]
        assert (h.count, h.bucket_counts, h.explicit_bounds, h.min, h.max) == (
            w.count,
            list(w.bucket_counts),
            list(w.explicit_bounds),
            w.min,
            w.max,
        )
        assert h.sum == pytest.approx(w.sum)
        # One exemplar per bucket: the last sampled measurement that fell in it.
        assert sorted((e.value, e.trace_id, e.span_id) for e in h.exemplars) == sorted(
            (e.value, e.trace_id, e.span_id) for e in w.exemplars
        )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(-5, 5)), max_size=60))
def test_counters_and_up_down_counters_match_the_sdk(ms: list[tuple[int, int]]) -> None:
    meter, reader = _sdk()
    sdk_up = meter.create_up_down_counter("u", "1", "d")
    sdk_c = meter.create_counter("c", "1", "d")
    agg = Aggregator()
    up = agg.up_down_counter("u", "1", "d")
    c = agg.counter("c", "1", "d")
    for which, amount in ms:
        sdk_up.add(amount, ATTR_SETS[which])
        up.add(amount, ATTR_SETS[which])
        if amount >= 0:
            sdk_c.add(amount, ATTR_SETS[which])
        c.add(amount, ATTR_SETS[which])  # a negative one is dropped and counted
    assert agg.invalid == sum(1 for _, a in ms if a < 0)
    got = agg.collect()
    if not ms:
        assert got is None
        return
    data = reader.get_metrics_data()
    for name in ("u", "c"):
        want = {k: p.value for k, p in _points(data, name).items()} if data else {}
        have = {k: p.value for k, p in _points(got, name).items()} if want else {}
        assert have == want


def test_a_value_on_a_bound_counts_in_the_bucket_it_closes() -> None:
    agg = Aggregator()
    h = agg.histogram("h", "s", "d", BOUNDS)
    for v in (0.0, 0.001, 0.0010001, 1.0, 1.5):
        h.record(v, ATTR_SETS[0])
    (p,) = _points(agg.collect(), "h").values()
    assert p.bucket_counts == [2, 1, 0, 1, 1]


def test_gauges_keep_the_last_value_and_its_exemplar() -> None:
    agg = Aggregator()
    g = agg.gauge("g", "{job}", "d")
    g.set(3, ATTR_SETS[0], TRACE, 7)
    g.set(5, ATTR_SETS[0])
    (p,) = _points(agg.collect(), "g").values()
    assert p.value == 5
    # The exemplar is the last sampled measurement, not the last one.
    assert [(e.value, e.span_id) for e in p.exemplars] == [(3, 7)]


def test_attribute_sets_past_the_limit_go_to_the_overflow_series() -> None:
    agg = Aggregator(cardinality_limit=2)
    c = agg.counter("c", "1", "d")
    for i in range(5):
        c.add(1, {"k": i})
    points = _points(agg.collect(), "c")
    assert {k: p.value for k, p in points.items()} == {
        (("k", 0),): 1,
        (("k", 1),): 1,
        tuple(OVERFLOW_ATTRIBUTES.items()): 3,
    }
    assert agg.overflowed == 3


def test_a_reused_attribute_dict_and_an_equal_new_one_are_one_series() -> None:
    agg = Aggregator()
    c = agg.counter("c", "1", "d")
    attrs = {"k": "v"}
    c.add(1, attrs)
    c.add(1, attrs)
    c.add(1, {"k": "v"})
    assert [p.value for p in _points(agg.collect(), "c").values()] == [3]


def test_cumulative_points_accumulate_and_exemplars_start_over() -> None:
    now = [1_000]
    agg = Aggregator(now_ns=lambda: now[0])
    h = agg.histogram("h", "s", "d", BOUNDS)
    h.record(0.5, ATTR_SETS[0], TRACE, 9)
    now[0] = 2_000
    (p1,) = _points(agg.collect(), "h").values()
    h.record(0.05, ATTR_SETS[0])
    now[0] = 3_000
    (p2,) = _points(agg.collect(), "h").values()
    assert (p1.count, p1.start_time_unix_nano, p1.time_unix_nano) == (1, 1_000, 2_000)
    assert (p2.count, p2.start_time_unix_nano, p2.time_unix_nano) == (2, 1_000, 3_000)
    assert len(p1.exemplars) == 1 and p2.exemplars == []


def test_delta_points_cover_the_time_since_the_last_collection() -> None:
    now = [1_000]
    agg = Aggregator(temporality="delta", now_ns=lambda: now[0])
    h = agg.histogram("h", "s", "d", BOUNDS)
    up = agg.up_down_counter("u", "1", "d")
    h.record(0.5, ATTR_SETS[0])
    up.add(2, ATTR_SETS[0])
    now[0] = 2_000
    first = agg.collect()
    now[0] = 2_500
    h.record(0.05, ATTR_SETS[0])
    now[0] = 3_000
    second = agg.collect()
    (p1,) = _points(first, "h").values()
    (p2,) = _points(second, "h").values()
    assert (p1.count, p1.start_time_unix_nano) == (1, 1_000)
    assert (p2.count, p2.start_time_unix_nano, p2.time_unix_nano) == (1, 2_000, 3_000)
    # Nothing new for the counter: no point.
    assert _points(second, "u") == {}


def test_lowmemory_keeps_up_down_counters_cumulative() -> None:
    agg = Aggregator(temporality="lowmemory")
    c = agg.counter("c", "1", "d")
    up = agg.up_down_counter("u", "1", "d")
    c.add(1, ATTR_SETS[0])
    up.add(1, ATTR_SETS[0])
    agg.collect()
    up.add(1, ATTR_SETS[0])
    data = agg.collect()
    assert [p.value for p in _points(data, "u").values()] == [2]
    assert _points(data, "c") == {}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="temporality"):
        Aggregator(temporality="sometimes")
    with pytest.raises(ValueError, match="cardinality"):
        Aggregator(cardinality_limit=0)
    agg = Aggregator()
    with pytest.raises(ValueError, match="ascending"):
        agg.histogram("h", "s", "d", (1.0, 0.5))
    agg.counter("c", "1", "d")
    with pytest.raises(ValueError, match="already exists"):
        agg.counter("c", "1", "d")
