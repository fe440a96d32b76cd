"""Metrics from finished request records: instruments, attributes, exemplars, export."""

from __future__ import annotations

import gzip
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.metrics import MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData

from zerver import CacheGet, ConfigError, DbGet, RecordMetrics, VirtualClock
from zerver.export import MetricsExportConfig, OtlpMetricExporter, meter_provider
from zerver.export._metrics_exporter import encode_metrics, metrics_from_json, metrics_json
from zerver.trace import JobState, ParkEpisode, RequestRecord, RetryRecord, StepRecord
from zerver.trace._aggregate import Aggregator
from zerver.trace._metrics import (
    HTTP_DURATION_BUCKETS,
    HTTP_DURATION_BUCKETS_MS,
    INSTRUMENTS,
    PHASE_BUCKETS,
)
from zerver.trace._offload import pack_record, unpack_record

MS = 1_000_000  # ns


def effect_job(rec: RequestRecord, index: int, name: str, effect: CacheGet | DbGet) -> JobState:
    """An effect job of ``rec``'s first step, on the effects queue, with its span id."""
    job = JobState(
        index=index,
        kind="effect",
        name=name,
        queue="effects",
        step_index=0,
        effect=effect,
    )
    job.span_id = rec.new_span_id()
    return job


def make_record(
    seed: int,
    *,
    status: int = 200,
    method: str = "GET",
    route: str | None = "/items/{id}",
    sampled: bool = True,
    duration_ms: float = 30.0,
    cache_hit: bool | None = True,
    taken: bool = True,
) -> RequestRecord:
    """A finished request of a known shape: one step, a cache get and a db get."""
    rec = RequestRecord(VirtualClock(), random.Random(seed))
    rec.start_trace()
    rec.trace_flags = 0x01 if sampled else 0x00
    rec.method, rec.route, rec.path, rec.query = method, route, "/items/42", "token=s3cret"
    rec.start_ts, rec.end_ts = 0, int(duration_ms * MS)
    rec.status, rec.request_body_size, rec.response_body_size = status, 12, 3456
    step = StepRecord(
        index=0, name="load_item", layer="route", sequence=0, reads=(), writes=(), start_ts=MS
    )
    step.span_id, step.end_ts, step.decision = rec.new_span_id(), 2 * MS, "Need"
    rec.steps.append(step)
    cache = effect_job(rec, 0, "cache.get items", CacheGet(namespace="items", key="42"))
    cache.enqueue_ts, cache.end_ts = 2 * MS, 5 * MS
    if taken:
        cache.take_ts, cache.start_ts = 3 * MS, 3 * MS + 500_000
    cache.outcome, cache.depth_enqueue = "complete", 3
    if cache_hit is not None:
        cache.result_meta = {"cache.hit": cache_hit}
    db = effect_job(rec, 1, "db.get items", DbGet(table="items", key="42"))
    db.enqueue_ts, db.take_ts, db.start_ts, db.end_ts = 2 * MS, 2 * MS, 2 * MS, 12 * MS
    ep = ParkEpisode("io_wait", 3 * MS, token="db_pool")
    ep.resume_ts = 9 * MS
    db.park_episodes.append(ep)
    db.retries.append(RetryRecord(4 * MS, 1, "timeout", 1.0))
    db.outcome, db.error_type, db.depth_enqueue = "fail", "TimeoutError", 5
    rec.jobs += [cache, db]
    return rec


def collect(records: list[RequestRecord], mode: str) -> MetricsData:
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader], exemplar_filter=TraceBasedExemplarFilter())
    metrics = RecordMetrics(provider, mode)
    for rec in records:
        metrics.record(rec)
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    return data


def by_name(data: MetricsData) -> dict[str, Any]:
    return {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


def points(data: MetricsData, name: str) -> list[Any]:
    return list(by_name(data)[name].data.data_points)


# -- instruments and attributes ---------------------------------------------------------------

HTTP_NEW = {"http.server.request.duration", "http.server.request.body.size"}
HTTP_NEW |= {"http.server.response.body.size"}
HTTP_OLD = {"http.server.duration", "http.server.request.size", "http.server.response.size"}


@pytest.mark.parametrize("mode", ["old", "new", "dup"])
def test_names_and_units_per_semconv_mode(mode: str) -> None:
    metrics = by_name(collect([make_record(1), make_record(2, cache_hit=False)], mode))
    expected = {n for n, (_, _, modes) in INSTRUMENTS.items() if mode in modes}
    expected.discard("http.server.active_requests")  # only the server's calls move it
    assert set(metrics) == expected
    assert bool(HTTP_NEW & set(metrics)) == (mode != "old")
    assert bool(HTTP_OLD & set(metrics)) == (mode != "new")
    for name, metric in metrics.items():
        assert metric.unit == INSTRUMENTS[name][0], name


def test_request_duration_seconds_with_the_semconv_buckets() -> None:
    data = collect([make_record(1, duration_ms=30.0)], "dup")
    (new,) = points(data, "http.server.request.duration")
    assert new.explicit_bounds == HTTP_DURATION_BUCKETS
    assert new.sum == pytest.approx(0.030)
    assert new.bucket_counts[HTTP_DURATION_BUCKETS.index(0.05)] == 1  # (0.025, 0.05]
    (old,) = points(data, "http.server.duration")
    assert old.explicit_bounds == HTTP_DURATION_BUCKETS_MS
    assert old.sum == pytest.approx(30.0)
    (step,) = points(data, "zerver.step.duration")
    assert step.explicit_bounds == PHASE_BUCKETS
    assert step.sum == pytest.approx(0.001)


def test_http_attributes_new_old_and_dup() -> None:
    data = collect([make_record(1)], "dup")
    (new,) = points(data, "http.server.request.duration")
    assert dict(new.attributes) == {
        "http.request.method": "GET",
        "http.route": "/items/{id}",
        "http.response.status_code": 200,
        "url.scheme": "http",
        "network.protocol.version": "1.1",
    }
    (old,) = points(data, "http.server.duration")
    assert dict(old.attributes) == {
        "http.method": "GET",
        "http.route": "/items/{id}",
        "http.status_code": 200,
        "http.scheme": "http",
        "http.flavor": "1.1",
    }
    (size,) = points(data, "http.server.response.body.size")
    assert size.sum == 3456 and dict(size.attributes) == dict(new.attributes)


def test_errors_unmatched_routes_and_odd_methods_stay_low_cardinality() -> None:
    records = [
        make_record(1, status=503),
        make_record(2, status=404, route=None),
        make_record(3, method="BREW"),
        make_record(4, method="GET"),
    ]
    records[0].error_type = "QueueFullError"
    data = collect(records, "new")
    by_attrs = {
        tuple(sorted(p.attributes.items())): p.count
        for p in points(data, "http.server.request.duration")
    }
    attrs = [dict(k) for k in by_attrs]
    assert {"error.type": "QueueFullError", "http.response.status_code": 503}.items() <= next(
        a for a in attrs if a.get("http.response.status_code") == 503
    ).items()
    not_found = next(a for a in attrs if a.get("http.response.status_code") == 404)
    assert "http.route" not in not_found and "error.type" not in not_found
    assert sum(1 for a in attrs if a["http.request.method"] == "_OTHER") == 1
    # No raw path, id or query anywhere.
    for metric in by_name(data).values():
        for p in metric.data.data_points:
            for value in p.attributes.values():
                assert "42" not in str(value) and "s3cret" not in str(value)


def test_job_and_effect_instruments() -> None:
    data = collect([make_record(1)], "new")

    def one(name: str, **attrs: object) -> Any:
        (p,) = [p for p in points(data, name) if attrs.items() <= dict(p.attributes).items()]
        return p

    assert one("zerver.job.queue_wait").sum == pytest.approx(0.001)  # cache 1 ms, db 0
    assert one("zerver.job.dispatch").sum == pytest.approx(0.0005)
    assert one("zerver.job.park_wait", **{"job.park.cause": "io_wait"}).sum == pytest.approx(0.006)
    # db: 10 ms started, 6 ms parked; cache: 1.5 ms.
    assert one("zerver.job.run_active").sum == pytest.approx(0.004 + 0.0015)
    failed = one("zerver.effect.duration", **{"effect.target": "items", "effect.system": "db"})
    assert dict(failed.attributes) == {
        "effect.system": "db",
        "effect.operation": "get",
        "effect.target": "items",
        "effect.outcome": "fail",
    }
    assert failed.sum == pytest.approx(0.010)
    (retries,) = points(data, "zerver.job.retries")
    assert retries.value == 1 and dict(retries.attributes) == {
        "job.queue": "effects",
        "job.name": "db.get items",
    }
    (depth,) = points(data, "zerver.job.depth")
    assert depth.value == 5 and dict(depth.attributes) == {"job.queue": "effects"}
    (hits,) = points(data, "zerver.cache.hits")
    assert hits.value == 1 and dict(hits.attributes)["effect.target"] == "items"
    assert "zerver.cache.misses" not in by_name(data)


def test_a_phase_that_never_happened_is_not_recorded_as_zero() -> None:
    data = collect([make_record(1, taken=False, cache_hit=False)], "new")
    assert sum(p.count for p in points(data, "zerver.job.queue_wait")) == 1  # the db job only
    assert sum(p.count for p in points(data, "zerver.job.dispatch")) == 1
    assert sum(p.count for p in points(data, "zerver.effect.duration")) == 2
    (misses,) = points(data, "zerver.cache.misses")
    assert misses.value == 1


def test_active_requests_move_with_the_servers_calls() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader])
    metrics = RecordMetrics(provider, "dup")
    metrics.request_started("GET", "http")
    metrics.request_started("GET", "http")
    metrics.request_started("BREW", "https")
    metrics.request_ended("GET", "http")
    data = reader.get_metrics_data()
    assert data is not None
    values = {
        (p.attributes["http.request.method"], p.attributes["url.scheme"]): p.value
        for p in points(data, "http.server.active_requests")
    }
    assert values == {("GET", "http"): 1, ("_OTHER", "https"): 1}
    assert by_name(data)["http.server.active_requests"].data.is_monotonic is False
    provider.shutdown()


def test_bad_semconv_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'both'"):
        RecordMetrics(MeterProvider(), "both")


def test_records_rebuilt_in_the_exporter_process_give_the_same_metrics() -> None:
    records = [make_record(i, sampled=False, status=200 + i % 2) for i in range(6)]
    direct = collect(records, "dup")
    unpacked = collect([unpack_record(pack_record(r)) for r in records], "dup")

    def summary(data: MetricsData) -> dict[str, list[tuple[object, ...]]]:
        out: dict[str, list[tuple[object, ...]]] = {}
        for name, m in by_name(data).items():
            out[name] = sorted(
                (
                    tuple(sorted(p.attributes.items())),
                    getattr(p, "count", None),
                    getattr(p, "sum", getattr(p, "value", None)),
                )
                for p in m.data.data_points
            )
        return out

    assert summary(unpacked) == summary(direct)


# -- counts and exemplars ---------------------------------------------------------------------


def exemplar_trace_ids(data: MetricsData) -> dict[str, set[tuple[int, int]]]:
    out: dict[str, set[tuple[int, int]]] = {}
    for name, m in by_name(data).items():
        for p in m.data.data_points:
            for e in p.exemplars:
                out.setdefault(name, set()).add((e.trace_id, e.span_id))
    return out


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from([200, 201, 404, 500, 503]),
            st.floats(min_value=0.1, max_value=12_000.0),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_counts_equal_records_and_exemplars_name_only_sampled_traces(
    shapes: list[tuple[bool, int, float]],
) -> None:
    records = [
        make_record(i, sampled=s, status=status, duration_ms=ms)
        for i, (s, status, ms) in enumerate(shapes)
    ]
    data = collect(records, "dup")
    for name in ("http.server.request.duration", "http.server.duration"):
        assert sum(p.count for p in points(data, name)) == len(records)
    assert sum(p.count for p in points(data, "zerver.effect.duration")) == 2 * len(records)
    sampled = {r.trace_id for r in records if r.trace_flags & 1}
    span_ids = {
        r.trace_id: {r.span_id, *(s.span_id for s in r.steps), *(j.span_id for j in r.jobs)}
        for r in records
    }
    found = exemplar_trace_ids(data)
    for ids in found.values():
        for trace_id, span_id in ids:
            assert trace_id in sampled
            assert span_id in span_ids[trace_id]
    if sampled:
        assert found["http.server.request.duration"]
    else:
        assert not found


def test_exemplars_point_at_the_span_that_was_measured() -> None:
    rec = make_record(7)
    data = collect([rec], "new")
    (ids,) = [exemplar_trace_ids(data)["http.server.request.duration"]]
    assert ids == {(rec.trace_id, rec.span_id)}
    effect_ids = exemplar_trace_ids(data)["zerver.effect.duration"]
    assert effect_ids == {(rec.trace_id, j.span_id) for j in rec.jobs}
    assert exemplar_trace_ids(data)["zerver.step.duration"] == {
        (rec.trace_id, rec.steps[0].span_id)
    }


# -- OTLP export against a real receiver ------------------------------------------------------


class _Receiver:
    """A minimal OTLP/HTTP metrics endpoint on 127.0.0.1: keeps each request's body."""

    def __init__(self, replies: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.replies = list(replies or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.path, dict(self.headers.items()), body))
                status, headers = receiver.replies.pop(0) if receiver.replies else (200, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", self.headers.get("Content-Type", ""))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
        r.thread.join(5)


def parse(headers: dict[str, str], body: bytes) -> ExportMetricsServiceRequest:
    """A received body as the official message (OTLP/JSON's hex ids turned back)."""
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    if headers["Content-Type"] == "application/x-protobuf":
        message: ExportMetricsServiceRequest = ExportMetricsServiceRequest.FromString(body)
        return message
    assert headers["Content-Type"] == "application/json"
    return metrics_from_json(body)


@pytest.mark.parametrize("protocol", ["http/json", "http/protobuf"])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_export_to_a_real_receiver_parses_with_the_official_schema(
    receiver: _Receiver, protocol: str, compression: str
) -> None:
    config = MetricsExportConfig(
        endpoint=receiver.endpoint,
        protocol=protocol,
        compression=compression,
        interval_s=3600.0,
        headers=(("x-tenant", "t1"),),
    )
    provider = meter_provider(config, {"service.name": "shop"}, shutdown_on_exit=False)
    assert provider is not None
    metrics = RecordMetrics(provider, "dup")
    records = [make_record(i, sampled=i % 3 == 0) for i in range(9)]
    for rec in records:
        metrics.record(rec)
    assert provider.force_flush(10_000)
    provider.shutdown()
    assert receiver.requests
    path, headers, body = receiver.requests[0]
    assert path == "/v1/metrics" and headers["x-tenant"] == "t1"
    request = parse(headers, body)
    (rm,) = request.resource_metrics
    resource = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
    assert resource["service.name"] == "shop" and resource["service.instance.id"]
    metrics_by_name = {m.name: m for sm in rm.scope_metrics for m in sm.metrics}
    duration = metrics_by_name["http.server.request.duration"]
    assert duration.unit == "s"
    (point,) = duration.histogram.data_points
    assert point.count == len(records)
    assert list(point.explicit_bounds) == list(HTTP_DURATION_BUCKETS)
    assert duration.histogram.aggregation_temporality == 2  # cumulative
    assert metrics_by_name["http.server.duration"].unit == "ms"
    assert metrics_by_name["zerver.job.retries"].sum.is_monotonic
    sampled = {r.trace_id.to_bytes(16, "big") for r in records if r.trace_flags & 1}
    exemplars = [
        e
        for m in metrics_by_name.values()
        for p in getattr(m, m.WhichOneof("data")).data_points
        for e in p.exemplars
    ]
    assert exemplars and all(e.trace_id in sampled for e in exemplars)


def test_the_encoding_matches_the_opentelemetry_exporters() -> None:
    common = pytest.importorskip(
        "opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder"
    )
    data = collect([make_record(i, sampled=i % 2 == 0) for i in range(5)], "dup")
    ours, n = encode_metrics(data)
    assert ours == common.encode_metrics(data)
    assert n == sum(len(m.data.data_points) for m in by_name(data).values())
    doc = orjson.loads(metrics_json(ours))
    ids = [
        e["traceId"]
        for sm in doc["resourceMetrics"][0]["scopeMetrics"]
        for m in sm["metrics"]
        for p in m.get("histogram", {}).get("dataPoints", ())
        for e in p.get("exemplars", ())
    ]
    assert ids and all(len(i) == 32 and int(i, 16) for i in ids)


def test_retryable_answers_are_retried_and_counted(receiver: _Receiver) -> None:
    receiver.replies = [(503, {"Retry-After": "0"})]
    exporter = OtlpMetricExporter(receiver.endpoint, protocol="http/protobuf")
    data = collect([make_record(1)], "new")
    assert exporter.export(data, timeout_millis=10_000).name == "SUCCESS"
    assert len(receiver.requests) == 2
    assert exporter.counts["retries"] == 1 and exporter.counts["exports"] == 1
    receiver.replies = [(400, {})]
    assert exporter.export(data, timeout_millis=10_000).name == "FAILURE"
    assert exporter.counts["failed"] == 1
    exporter.shutdown()


def test_an_absent_collector_fails_the_export_without_raising() -> None:
    exporter = OtlpMetricExporter("http://127.0.0.1:9/v1/metrics")
    data = collect([make_record(1)], "new")
    assert exporter.export(data, timeout_millis=200).name == "FAILURE"
    assert exporter.counts["failed"] == 1
    exporter.shutdown()


# -- settings ---------------------------------------------------------------------------------


def test_defaults_and_fallback_to_the_generic_variables() -> None:
    cfg = MetricsExportConfig.from_env({})
    assert (cfg.exporter, cfg.endpoint, cfg.protocol) == (
        "otlp",
        "http://localhost:4318/v1/metrics",
        "http/json",
    )
    assert (cfg.interval_s, cfg.export_timeout_s, cfg.temporality) == (60.0, 30.0, "cumulative")
    generic = MetricsExportConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        }
    )
    assert generic.endpoint == "http://collector:4318/v1/metrics"
    assert (generic.protocol, generic.headers, generic.timeout_s) == (
        "http/protobuf",
        (("a", "1"),),
        2.5,
    )
    specific = MetricsExportConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:9090/custom",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "b=2%2C3",
            "OTEL_METRICS_EXPORTER": "Console",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "DELTA",
        }
    )
    assert specific.endpoint == "http://m:9090/custom"  # used as is
    assert (specific.protocol, specific.headers) == ("http/json", (("b", "2,3"),))
    assert (specific.exporter, specific.interval_s, specific.temporality) == (
        "console",
        1.0,
        "delta",
    )


@pytest.mark.parametrize(
    ("var", "value", "accepted"),
    [
        ("OTEL_METRICS_EXPORTER", "prometheus", "otlp, console or none"),
        ("OTEL_METRICS_EXPORTER", "jaeger", "one of otlp, console, none"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "0", "milliseconds > 0"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "soon", "milliseconds > 0"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "-5", "milliseconds > 0"),
        ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "sometimes", "cumulative, delta"),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://x", "http:// or https://"),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc", "http/json or http/protobuf"),
        ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "novalue", "key=value"),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "0", "milliseconds > 0"),
        ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "zstd", "gzip, none"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "x", "milliseconds"),
    ],
)
def test_a_bad_value_is_one_line_naming_variable_value_and_accepted(
    var: str, value: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        MetricsExportConfig.from_env({var: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{var}={value!r}")
    assert accepted in message


def test_meter_provider_per_exporter_choice() -> None:
    assert meter_provider(MetricsExportConfig(exporter="none")) is None
    reader = InMemoryMetricReader()
    provider = meter_provider(
        MetricsExportConfig(exporter="none"),
        {"service.name": "s", "service.instance.id": "worker-2"},
        readers=[reader],
        shutdown_on_exit=False,
    )
    assert provider is not None
    RecordMetrics(provider, "new").record(make_record(1))
    data = reader.get_metrics_data()
    assert data is not None
    assert data.resource_metrics[0].resource.attributes["service.instance.id"] == "worker-2"
    provider.shutdown()
    one = meter_provider(MetricsExportConfig(exporter="none"), readers=[InMemoryMetricReader()])
    two = meter_provider(MetricsExportConfig(exporter="none"), readers=[InMemoryMetricReader()])
    assert one is not None and two is not None
    ids = {p._sdk_config.resource.attributes["service.instance.id"] for p in (one, two)}
    assert len(ids) == 2  # each process (provider) its own
    one.shutdown()
    two.shutdown()


# -- zerver's own aggregation against the SDK's ----------------------------------------------


def _summary(data: MetricsData) -> dict[str, Any]:
    """Everything a backend gets, by metric then attribute set; exemplars of
    histograms only (the SDK picks a sum's or a gauge's exemplar at random)."""
    out: dict[str, Any] = {}
    for name, m in by_name(data).items():
        pts = {}
        for p in m.data.data_points:
            row: dict[str, Any] = {"value": getattr(p, "value", None)}
            if hasattr(p, "bucket_counts"):
                row.update(
                    count=p.count,
                    sum=round(p.sum, 9),
                    buckets=list(p.bucket_counts),
                    bounds=list(p.explicit_bounds),
                    min=p.min,
                    max=p.max,
                    exemplars=sorted((e.value, e.trace_id, e.span_id) for e in p.exemplars),
                )
            pts[tuple(sorted(p.attributes.items()))] = row
        data_type = type(m.data).__name__
        temporality = getattr(m.data, "aggregation_temporality", None)
        monotonic = getattr(m.data, "is_monotonic", None)
        out[name] = (m.unit, m.description, data_type, temporality, monotonic, pts)
    return out


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from([200, 404, 500]),
            st.floats(min_value=0.1, max_value=12_000.0),
            st.sampled_from([True, False, None]),
        ),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["old", "new", "dup"]),
)
def test_zervers_aggregator_gives_the_sdks_points(
    shapes: list[tuple[bool, int, float, bool | None]], mode: str
) -> None:
    records = [
        make_record(i, sampled=s, status=status, duration_ms=ms, cache_hit=hit)
        for i, (s, status, ms, hit) in enumerate(shapes)
    ]
    agg = Aggregator()
    metrics = RecordMetrics(agg, mode)
    for rec in records:
        metrics.record(rec)
    metrics.request_started("GET")
    own = agg.collect()
    assert own is not None
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader], exemplar_filter=TraceBasedExemplarFilter())
    sdk_metrics = RecordMetrics(provider, mode)
    for rec in records:
        sdk_metrics.record(rec)
    sdk_metrics.request_started("GET")
    sdk = reader.get_metrics_data()
    provider.shutdown()
    assert sdk is not None
    assert _summary(own) == _summary(sdk)
