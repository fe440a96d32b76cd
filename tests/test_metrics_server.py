"""The server's own metrics: a real `zerver demo` process, real OTLP/HTTP receivers."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from demo_process import operator_env, zerver_process
from test_metrics import parse

from zerver.export import ExportStats, OtlpReceiver
from zerver.trace._aggregate import Aggregator
from zerver.trace._metrics_worker import PipelineObserver

ROUTE = "/blogs/posts/{id}"


@pytest.fixture
def receivers() -> Iterator[tuple[OtlpReceiver, OtlpReceiver]]:
    with (
        OtlpReceiver() as traces,
        OtlpReceiver(path="/v1/metrics") as metrics,
    ):
        yield traces, metrics


def _env(
    tmp_path: Path, traces: OtlpReceiver, metrics: OtlpReceiver, **extra: str
) -> dict[str, str]:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces.endpoint,
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{metrics.port}/v1/metrics",
        # Only the export at shutdown, unless a test says otherwise.
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
        "ZER_VER_DB_PATH": str(tmp_path / "blog.sqlite3"),
    }
    return operator_env(tmp_path, tmp_path / "state", **{**env, **extra})


def _serve(env: dict[str, str], tmp_path: Path, posts: int, missing: int) -> list[str]:
    """Run the demo, make the requests, stop it with SIGTERM; its log lines."""
    with zerver_process(["demo"], env, tmp_path) as (proc, port, lines):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(posts):
                assert client.get("/blogs/posts/1").status_code == 200
            for _ in range(missing):
                assert client.get("/nothing/here").status_code == 404
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    return [str(line) for line in lines]


def _points(metrics: OtlpReceiver, name: str) -> list[Any]:
    out = []
    for req in metrics.requests:
        request = parse(req.headers | {"Content-Type": req.content_type}, req.body)
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        out.extend(getattr(m, m.WhichOneof("data")).data_points)
    return out


def _route(point: Any) -> str | None:
    for kv in point.attributes:
        if kv.key == "http.route":
            return str(kv.value.string_value)
    return None


@pytest.mark.parametrize("process", ["on", "off"])
def test_every_request_is_counted_and_exemplars_name_exported_traces(
    tmp_path: Path, receivers: tuple[OtlpReceiver, OtlpReceiver], process: str
) -> None:
    traces, metrics = receivers
    env = _env(tmp_path, traces, metrics, ZER_VER_EXPORT_PROCESS=process)
    _serve(env, tmp_path, posts=12, missing=3)
    points = _points(metrics, "http.server.request.duration")
    # Cumulative: the last collection (at shutdown) holds every request.
    by_route: dict[str | None, int] = {}
    for p in points:
        by_route[_route(p)] = max(by_route.get(_route(p), 0), p.count)
    assert by_route == {ROUTE: 12, None: 3}
    trace_ids = {bytes.fromhex(s["traceId"]) for s in traces.spans()}
    exemplars = [e for p in points for e in p.exemplars]
    assert exemplars and all(e.trace_id in trace_ids for e in exemplars)
    # Requests in flight, counted by the server: none once it stopped.
    active = _points(metrics, "http.server.active_requests")
    assert active and active[-1].as_int == 0
    # The job phases are there too, named as documented.
    assert _points(metrics, "zerver.job.queue_wait")
    assert _points(metrics, "zerver.effect.duration")


def test_sampled_out_requests_are_counted_without_exemplars(
    tmp_path: Path, receivers: tuple[OtlpReceiver, OtlpReceiver]
) -> None:
    traces, metrics = receivers
    env = _env(
        tmp_path, traces, metrics, ZER_VER_EXPORT_PROCESS="on", OTEL_TRACES_SAMPLER="always_off"
    )
    _serve(env, tmp_path, posts=8, missing=0)
    points = _points(metrics, "http.server.request.duration")
    assert max(p.count for p in points if _route(p) == ROUTE) == 8
    assert not [e for p in points for e in p.exemplars]
    assert traces.spans() == []


def test_metrics_are_exported_every_interval_while_serving(
    tmp_path: Path, receivers: tuple[OtlpReceiver, OtlpReceiver]
) -> None:
    traces, metrics = receivers
    env = _env(
        tmp_path, traces, metrics, ZER_VER_EXPORT_PROCESS="on", OTEL_METRIC_EXPORT_INTERVAL="200"
    )
    with zerver_process(["demo"], env, tmp_path) as (proc, port, _lines):
        assert httpx.get(f"http://127.0.0.1:{port}/blogs/posts/1").status_code == 200
        # Bounded wait for the periodic exports (every 200 ms) while the server runs.
        assert metrics.wait_for_requests(2, timeout=20)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_metrics_without_traces_built_is_a_start_up_error(tmp_path: Path) -> None:
    env = operator_env(
        tmp_path, tmp_path / "state", OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="otlp"
    )
    done = subprocess.run(  # noqa: PLW1510 (the exit code is the assertion)
        [sys.executable, "-m", "zerver", "demo", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    err = done.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "OTEL_METRICS_EXPORTER" in err[0] and "always_off" in err[0]


def _value(metrics: OtlpReceiver, name: str, **attrs: str) -> float:
    """The last exported value of the ``name`` series whose attributes include ``attrs``."""
    value = 0.0
    for p in _points(metrics, name):
        have = {kv.key: kv.value.string_value for kv in p.attributes}
        if all(have.get(k) == v for k, v in attrs.items()) and (
            "error.type" in attrs or "error.type" not in have
        ):
            value = p.as_int or p.as_double
    return value


@pytest.mark.parametrize("process", ["on", "off"])
def test_the_pipelines_own_counters_match_what_the_backend_received(
    tmp_path: Path, receivers: tuple[OtlpReceiver, OtlpReceiver], process: str
) -> None:
    traces, metrics = receivers
    env = _env(tmp_path, traces, metrics, ZER_VER_EXPORT_PROCESS=process)
    _serve(env, tmp_path, posts=10, missing=2)
    received = len(traces.spans())
    kind = "otlp_http_json_span_exporter"
    assert _value(metrics, "otel.sdk.exporter.span.exported", **{"otel.component.type": kind}) == (
        received
    )
    assert _value(metrics, "otel.sdk.processor.span.queue.capacity") > 0
    assert _value(metrics, "zerver.export.breaker.state") == 0  # closed


def _stats(**changes: Any) -> ExportStats:
    base: dict[str, Any] = {
        "submitted": 0,
        "exported": 0,
        "dropped": {},
        "queue_depth": 0,
        "queue_capacity": 2048,
        "in_flight": 0,
        "batches_exported": 0,
        "batches_failed": 0,
        "permanent_failures": 0,
        "retries": 0,
        "partial_rejections": 0,
        "rate_limited": 0,
        "breaker_state": "closed",
        "breaker_openings": 0,
        "bytes_sent": 0,
        "export_latency_last_ms": 0.0,
        "export_latency_avg_ms": 0.0,
        "export_latency_max_ms": 0.0,
    }
    return ExportStats(**{**base, **changes})


def test_the_pipeline_observer_adds_what_changed_between_collections() -> None:
    agg = Aggregator()
    observer = PipelineObserver(agg, "http/protobuf")
    observer.observe(_stats(exported=10, queue_depth=5, dropped={"queue_full": 2}, retries=1))
    agg.collect()
    observer.observe(
        _stats(
            exported=25,
            replayed=5,
            queue_depth=1,
            dropped={"queue_full": 2, "export_failed": 3},
            retries=4,
            spooled=7,
            breaker_state="open",
        )
    )
    data = agg.collect()
    assert data is not None
    got: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {
        (m.name, tuple(sorted((p.attributes or {}).items()))): getattr(p, "value", None)
        for m in data.resource_metrics[0].scope_metrics[0].metrics
        for p in m.data.data_points
    }
    exporter = (
        ("otel.component.name", "otlp_http_span_exporter/0"),
        ("otel.component.type", "otlp_http_span_exporter"),
    )
    processor = (
        ("otel.component.name", "batching_span_processor/0"),
        ("otel.component.type", "batching_span_processor"),
    )
    assert got == {
        ("otel.sdk.exporter.span.exported", exporter): 30,
        ("otel.sdk.exporter.span.exported", (("error.type", "export_failed"), *exporter)): 3,
        ("otel.sdk.exporter.span.exported", (("error.type", "queue_full"), *exporter)): 2,
        ("otel.sdk.processor.span.queue.size", processor): 1,
        ("otel.sdk.processor.span.queue.capacity", processor): 2048,
        ("zerver.export.retries", ()): 4,
        ("zerver.export.spooled", ()): 7,
        ("zerver.export.breaker.state", ()): 2,
    }


@pytest.mark.anyio
async def test_requests_in_flight_are_counted_and_become_the_active_requests_metric() -> None:
    import anyio

    from zerver import App, Context, DbGet, Done, Need, RecordMetrics, Response, load_settings
    from zerver import step as make_step
    from zerver.testing import AppClient, FakeInterpreter

    app = App("active", settings=load_settings({}))
    fake = FakeInterpreter(app.clock)
    gate = anyio.Event()
    fake.on("db.get t", result=1, gate=gate)
    app.interpreter("db", fake)

    @make_step
    def answer(ctx: Context) -> Done:
        return Done(Response.text("ok"))

    @make_step
    def ask(ctx: Context) -> Need:
        return Need(DbGet(table="t", key="k"), then=answer)

    app.get("/held", ask)
    app.get("/quick", answer)
    active = app.count_active_requests()
    agg = Aggregator()
    metrics = RecordMetrics(agg, "new")

    def in_flight_metric() -> int:
        metrics.set_active(dict(active))
        data = agg.collect()
        assert data is not None
        (m,) = [
            m
            for m in data.resource_metrics[0].scope_metrics[0].metrics
            if m.name == "http.server.active_requests"
        ]
        return sum(int(getattr(p, "value", 0)) for p in m.data.data_points)

    async with AppClient(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/held")
        tg.start_soon(client.get, "/held")
        with anyio.fail_after(5):  # bounded: both requests reach the gate
            while active.get(("GET", "http"), 0) < 2:
                await anyio.sleep(0)
        await client.get("/quick")  # in and out: leaves the count as it was
        assert active == {("GET", "http"): 2}
        assert in_flight_metric() == 2
        gate.set()
    assert active == {("GET", "http"): 0}
    assert in_flight_metric() == 0


def test_each_worker_reports_with_its_own_instance_id_and_the_counts_add_up(
    tmp_path: Path, receivers: tuple[OtlpReceiver, OtlpReceiver]
) -> None:
    traces, metrics = receivers
    env = _env(tmp_path, traces, metrics, ZER_VER_EXPORT_PROCESS="on")
    served = 0
    with zerver_process(["demo", "--workers", "2"], env, tmp_path) as (proc, port, _lines):
        for _ in range(16):  # a fresh connection each time, so either worker may answer
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                assert client.get("/blogs/posts/1").status_code == 200
                served += 1
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=90)
    # The last export of each process holds its totals (cumulative).
    last: dict[str, int] = {}
    for req in metrics.requests:
        request = parse(req.headers | {"Content-Type": req.content_type}, req.body)
        for rm in request.resource_metrics:
            ids = [kv.value.string_value for kv in rm.resource.attributes]
            keys = [kv.key for kv in rm.resource.attributes]
            instance = ids[keys.index("service.instance.id")]
            count = sum(
                p.count
                for sm in rm.scope_metrics
                for m in sm.metrics
                if m.name == "http.server.request.duration"
                for p in m.histogram.data_points
            )
            last[instance] = max(last.get(instance, 0), count)
    assert len(last) == 2  # one series set per worker process
    assert sum(last.values()) == served
