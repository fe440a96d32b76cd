"""Smoke tests of the load-test harness pieces (fast; every server and socket is closed)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind as OtelSpanKind

import zerver
from loadtest._contenders import BLOG, ITEMS, Contender, by_name
from loadtest._loadgen import LoadResult, LoadSpec, run_load, run_python_load
from loadtest._receiver import SpanReceiver, TallySnapshot
from loadtest._runner import (
    ContenderResult,
    Report,
    WorkloadResult,
    _account,
    format_table,
    free_port,
    median_ratios,
    ratio_lines,
    ratios,
    round_ratios,
    stop_process,
    wait_ready,
    write_results,
    write_svg,
)
from loadtest.apps import starlette_app
from loadtest.apps.h11_floor import BODY, _FloorProtocol
from zerver.demo import SEED_AUTHORS, SEED_POSTS
from zerver.demo import create_app as create_demo_app
from zerver.testing import AppClient

ROOT = Path(__file__).resolve().parent.parent


def _post(url: str, body: bytes, content_type: str) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=5) as resp:
        status: int = resp.status
        return status


def _json_span(trace: str, span: str, parent: str, kind: int, route: str = "") -> dict[str, object]:
    attrs = [{"key": "http.route", "value": {"stringValue": route}}] if route else []
    return {
        "traceId": trace,
        "spanId": span,
        "parentSpanId": parent,
        "name": f"GET {route}" if route else "step",
        "kind": kind,
        "attributes": attrs,
    }


def test_receiver_counts_json_and_protobuf_spans() -> None:
    t1, t2 = "11" * 16, "22" * 16
    doc = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            _json_span(t1, "a1" * 8, "", 2, "/items/{id}"),
                            _json_span(t1, "a2" * 8, "a1" * 8, 1),
                            _json_span(t1, "a3" * 8, "a1" * 8, 3),
                        ]
                    }
                ]
            }
        ]
    }
    message = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                scope_spans=[
                    ScopeSpans(
                        spans=[
                            Span(
                                trace_id=bytes.fromhex(t2),
                                span_id=b"\x01" * 8,
                                name="GET /blogs/posts/{id}",
                                kind=Span.SPAN_KIND_SERVER,
                                attributes=[
                                    KeyValue(
                                        key="http.route",
                                        value=AnyValue(string_value="/blogs/posts/{id}"),
                                    )
                                ],
                            ),
                            Span(
                                trace_id=bytes.fromhex(t2),
                                span_id=b"\x02" * 8,
                                parent_span_id=b"\x01" * 8,
                                name="db.get blog_post",
                                kind=Span.SPAN_KIND_CLIENT,
                            ),
                        ]
                    )
                ]
            )
        ]
    )
    with SpanReceiver() as receiver:
        url = receiver.traces_endpoint
        assert _post(url, orjson.dumps(doc), "application/json") == 200
        assert _post(url, message.SerializeToString(), "application/x-protobuf") == 200
        assert receiver.wait_quiet(quiet_s=0.05, timeout_s=5)
        snap = receiver.snapshot()
    assert (snap.spans, snap.root_server_spans, snap.export_requests) == (5, 2, 2)
    assert snap.decode_errors == 0
    assert {k: (v.roots, v.spans) for k, v in snap.by_root.items()} == {
        "/items/{id}": (1, 3),
        "/blogs/posts/{id}": (1, 2),
    }


def test_receiver_goes_down_and_comes_back_on_its_port_keeping_its_tally() -> None:
    """The fault run's collector outage: refused while down, the same port after, and
    what was counted before is still counted (a trace sent twice counts once)."""

    def body(trace: str) -> bytes:
        root = _json_span(trace, "01" * 8, "", 2, "/blogs/posts/{id}")
        return orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [root]}]}]})

    with SpanReceiver() as receiver:
        url, port = receiver.traces_endpoint, receiver.port
        assert _post(url, body("11" * 16), "application/json") == 200
        receiver.go_down()
        with pytest.raises(urllib.error.URLError):
            _post(url, body("22" * 16), "application/json")
        receiver.come_back()
        assert receiver.port == port
        assert _post(url, body("22" * 16), "application/json") == 200
        assert _post(url, body("22" * 16), "application/json") == 200  # again: at least once
        assert receiver.wait_quiet(quiet_s=0.05, timeout_s=5)
        snap = receiver.snapshot()
    assert snap.by_root["/blogs/posts/{id}"].roots == 2
    assert snap.root_server_spans == 3


def test_the_fault_run_reads_the_servers_closing_line(tmp_path: Path) -> None:
    from loadtest.fault_run import _closing_line, _losses

    log = tmp_path / "server.log"
    closing = {"event": "trace export stopped", "records_lost": 0, "spans_dropped": {}}
    log.write_text(
        "not json\n"
        + json.dumps({"event": "trace export stopped", "records_lost": 3})  # an earlier one
        + "\n"
        + json.dumps(closing)
        + "\n"
        + json.dumps({"event": "server stopped"})
        + "\n"
    )
    assert _closing_line(log) == closing
    assert _losses(closing) == {}
    lossy = {**closing, "records_lost": 2, "spans_dropped": {"spool_full": 5}}
    assert _losses(lossy) == {"records_lost": 2, "spans_dropped": {"spool_full": 5}}
    (tmp_path / "empty.log").write_text("")
    assert _closing_line(tmp_path / "empty.log") == {}


def test_python_loadgen_counts_responses_and_stops_at_its_bound() -> None:
    async def scenario() -> tuple[LoadResult, LoadResult]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_FloorProtocol, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            by_count = await run_python_load(
                LoadSpec(port=port, path="/x", connections=4, duration_s=5, max_requests=300)
            )
            by_time = await run_python_load(
                LoadSpec(port=port, path="/x", connections=2, duration_s=0.2, timeout_s=1)
            )
            return by_count, by_time
        finally:
            server.close()
            await server.wait_closed()

    by_count, by_time = asyncio.run(scenario())
    assert by_count.requests == 300
    assert by_count.errors == 0
    assert by_count.duration_s < 5
    assert by_count.p50_ms <= by_count.p99_ms <= by_count.max_ms
    assert by_time.requests > 0
    assert by_time.errors == 0
    assert by_time.duration_s < 1.2


def test_python_loadgen_process_drives_the_anyio_floor_server() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "loadtest.apps.h11_floor", "--transport", "anyio"]
    proc = subprocess.Popen(
        [*argv, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_ready(port, proc, timeout_s=15)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/items/1", timeout=5) as resp:
            assert resp.read() == BODY
        result = run_load(
            LoadSpec(port=port, path="/items/1", connections=2, duration_s=0.5, max_requests=200),
            "python",
        )
    finally:
        killed = stop_process(proc, timeout_s=10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert not killed
    assert proc.returncode == 0
    assert result.tool == "python"
    assert result.requests == 200
    assert result.errors == 0


def _contender(name: str, *, check: bool) -> Contender:
    return Contender(
        name=name, title=name, argv=("x",), workloads=(ITEMS, BLOG), traced=True, check_spans=check
    )


def _snapshot(roots: int) -> TallySnapshot:
    return TallySnapshot(
        spans=3 * roots, root_server_spans=roots, export_requests=1, decode_errors=0
    )


def test_span_loss_is_root_server_spans_short_of_completed_requests() -> None:
    def account(roots: int, check: bool) -> ContenderResult:
        result = ContenderResult(name="z", title="z", traced=True, check_spans=check)
        result.workloads = [
            WorkloadResult(
                contender="z",
                workload="items",
                path="/items/42",
                warmup_requests=10,
                load=LoadResult(tool="wrk", requests=90, duration_s=1.0),
            ),
            WorkloadResult(
                contender="z",
                workload="blog",
                path="/blogs/posts/1",
                load=LoadResult(tool="wrk", requests=100, duration_s=1.0),
            ),
        ]
        _account(result, _contender("z", check=check), _snapshot(roots))
        return result

    assert account(200, check=True).ok
    assert account(205, check=True).ok  # requests in flight when the generator stopped
    lost = account(199, check=True)
    assert lost.problems == [
        "z: lost spans: 199 root SERVER spans received for 200 completed requests (1 missing)"
    ]
    peer = account(150, check=False)
    assert peer.ok
    assert peer.notes


def test_a_contender_that_served_nothing_fails() -> None:
    result = ContenderResult(name="z", title="z", traced=False, check_spans=False)
    result.workloads = [
        WorkloadResult(
            contender="z",
            workload="items",
            path="/items/42",
            load=LoadResult(tool="wrk", requests=0, duration_s=1.0),
        )
    ]
    contender = Contender(name="z", title="z", argv=("x",))
    _account(result, contender, _snapshot(0))
    assert result.problems == ["z /items/42: served no requests"]


def test_results_json_table_and_chart_are_written(tmp_path: Path) -> None:
    result = ContenderResult(name="zerver-otlp", title="t", traced=True, check_spans=True)
    result.workloads = [
        WorkloadResult(
            contender="zerver-otlp",
            workload="items",
            path="/items/42",
            warmup_requests=5,
            load=LoadResult(tool="wrk", requests=995, duration_s=2.0, p50_ms=1.5, p99_ms=4.0),
            spans=3000,
            root_spans=1000,
        )
    ]
    report = Report(
        started="2026-01-01T00:00:00+00:00",
        elapsed_s=3.0,
        machine={"cpus": 2},
        config={"quick": True},
        contenders=[result],
        ratios={},
    )
    path = write_results(report, tmp_path)
    saved = json.loads(path.read_text())
    assert saved == json.loads((tmp_path / "latest.json").read_text())
    assert saved["ok"] is True
    (row,) = saved["contenders"][0]["workloads"]
    assert row["load"]["rps"] == 497.5
    assert row["requests_total"] == 1000
    table = format_table(report)
    assert (
        "| zerver-otlp | /items/42 | 498 | 1.50 | 4.00 | 0 | 995 | 3000 | 3.00 | 1000 / 1000 |"
        in (table)
    )
    svg = write_svg(report, tmp_path / "chart.svg").read_text()
    assert svg.startswith("<svg") and "zerver-otlp /items/42" in svg


def test_contenders_are_chosen_by_name() -> None:
    assert [c.name for c in by_name(["floor-anyio", "zerver"])] == ["zerver", "floor-anyio"]
    assert len(by_name([])) == 14
    try:
        by_name(["nope"])
    except ValueError as exc:
        assert "unknown contender 'nope'" in str(exc)
    else:
        raise AssertionError("expected ValueError")


# -- the blog route: Starlette serves zerver's bytes --------------------------------

BLOG_TARGETS = ("/blogs/posts/1", "/blogs/posts/1", "/blogs/posts/2", "/blogs/posts/nope")
"""Post 1 twice: the first author comes from SQLite (a cache miss), the next from the cache."""


def _http_get(port: int, target: str) -> tuple[int, bytes, str]:
    url = f"http://127.0.0.1:{port}{target}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read(), err.headers.get("content-type", "")


def _zerver_answers(db_path: Path, targets: tuple[str, ...]) -> list[tuple[int, bytes, str]]:
    async def scenario() -> list[tuple[int, bytes, str]]:
        app = create_demo_app(settings=zerver.load_settings({}, db_path=str(db_path)))
        out: list[tuple[int, bytes, str]] = []
        async with AppClient(app) as client:
            for target in targets:
                resp = await client.get(target)
                ctype = next((v for k, v in resp.headers if k == "content-type"), "")
                out.append((resp.status, resp.body, ctype))
        return out

    return asyncio.run(scenario())


def test_starlette_blog_route_serves_zerver_demo_bytes_from_the_same_file(tmp_path: Path) -> None:
    # Starlette first, on a fresh file: it creates zerver's tables and seeds the demo rows,
    # then zerver's demo reads that same file (and finds nothing to seed).
    db_path = tmp_path / "loadtest.sqlite3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ZER_VER_"))}
    env["ZER_VER_DB_PATH"] = str(db_path)
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--http", "h11", "--log-level", "warning"]
    proc = subprocess.Popen(
        [*argv, "loadtest.apps.starlette_app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_ready(port, proc, timeout_s=20)
        starlette = [_http_get(port, t) for t in BLOG_TARGETS]
        items = _http_get(port, "/items/42")
    finally:
        killed = stop_process(proc, timeout_s=10)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert not killed
    assert "Traceback" not in stderr, stderr
    assert db_path.exists()
    assert items[0] == 200
    zerver_answers = _zerver_answers(db_path, BLOG_TARGETS)
    assert starlette == zerver_answers
    assert [status for status, _, _ in starlette] == [200, 200, 200, 404]
    assert orjson.loads(starlette[0][1]) == {
        "post": SEED_POSTS["1"],
        "author": SEED_AUTHORS["ada"],
    }
    assert starlette[3][1] == b'{"error":"post not found","key":"nope"}'
    assert {ctype for _, _, ctype in starlette} == {"application/json"}


def test_traced_starlette_blog_route_makes_a_span_per_cache_and_db_call(tmp_path: Path) -> None:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    db_path = tmp_path / "traced.sqlite3"
    inner = starlette_app.create_app(str(db_path), tracer=provider.get_tracer("test"))
    traced = OpenTelemetryMiddleware(inner, tracer_provider=provider)

    async def scenario() -> list[tuple[int, bytes]]:
        transport = httpx.ASGITransport(app=traced)
        async with (
            inner.router.lifespan_context(inner),
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        ):
            out = []
            for target in ("/blogs/posts/1", "/blogs/posts/1"):
                resp = await client.get(target)
                out.append((resp.status_code, resp.content))
            return out

    answers = asyncio.run(scenario())
    provider.shutdown()
    assert answers == [(s, b) for s, b, _ in _zerver_answers(db_path, ("/blogs/posts/1",) * 2)]

    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 2 and all(s.kind == OtelSpanKind.SERVER for s in roots)

    def calls(root: ReadableSpan) -> list[tuple[str, object]]:
        assert root.context is not None
        return [
            (s.name, (s.attributes or {}).get("cache.hit", (s.attributes or {}).get("db.system")))
            for s in spans
            if s.kind == OtelSpanKind.CLIENT
            and s.parent is not None
            and s.parent.span_id == root.context.span_id
        ]

    # Spans end in the order they were started here; the first request misses the cache.
    assert calls(roots[0]) == [
        ("cache.get author_profile", False),
        ("db.get blog_post", "sqlite"),
        ("db.get author", "sqlite"),
        ("cache.set author_profile", None),
    ]
    assert calls(roots[1]) == [("cache.get author_profile", True), ("db.get blog_post", "sqlite")]


# -- ratios ------------------------------------------------------------------------


def _served(
    name: str, items_rps: int, blog_rps: int | None = None, *, p99_ms: float = 2.0
) -> ContenderResult:
    result = ContenderResult(name=name, title=name, traced=False, check_spans=False)
    loads = [(ITEMS, items_rps)] + ([(BLOG, blog_rps)] if blog_rps is not None else [])
    result.workloads = [
        WorkloadResult(
            contender=name,
            workload=w.name,
            path=w.path,
            route=w.route,
            load=LoadResult(tool="wrk", requests=rps, duration_s=1.0, p99_ms=p99_ms),
        )
        for w, rps in loads
    ]
    return result


def test_ratios_are_given_per_route_with_the_blog_route(tmp_path: Path) -> None:
    results = [
        _served("starlette", 1000, 500),
        _served("starlette-otel", 500, 250),
        _served("zerver", 2000, 1500),
        _served("zerver-otlp", 1500, 1000),
        _served("floor-anyio", 3000),
    ]
    got = ratios(results)
    assert got == {
        "/items/{id}": {
            "zerver-otlp / starlette": 1.5,
            "zerver-otlp / starlette-otel": 3.0,
            "zerver-otlp / floor-anyio": 0.5,
            "zerver-otlp / zerver": 0.75,
            "zerver / starlette": 2.0,
        },
        "/blogs/posts/{id}": {
            "zerver-otlp / starlette": 2.0,
            "zerver-otlp / starlette-otel": 4.0,
            "zerver-otlp / zerver": 0.667,
            "zerver / starlette": 3.0,
        },
    }
    report = Report(
        started="2026-01-01T00:00:00+00:00",
        elapsed_s=3.0,
        machine={"cpus": 2},
        config={"quick": True},
        contenders=results,
        ratios=got,
    )
    blog_line = (
        "req/s ratios on GET /blogs/posts/{id}: zerver-otlp / starlette = 2.00, "
        "zerver-otlp / starlette-otel = 4.00, zerver-otlp / zerver = 0.67, "
        "zerver / starlette = 3.00"
    )
    lines = ratio_lines(report)
    assert len(lines) == 2
    assert lines[0].startswith("req/s ratios on GET /items/{id}: zerver-otlp / starlette = 1.50")
    assert lines[1] == blog_line
    table = format_table(report)
    assert table.endswith("\n" + "\n".join(lines))
    assert "| starlette | /blogs/posts/1 | 500 |" in table
    saved = json.loads(write_results(report, tmp_path).read_text())
    assert saved["ratios"]["/blogs/posts/{id}"]["zerver / starlette"] == 3.0
    assert saved["contenders"][0]["workloads"][1]["route"] == "/blogs/posts/{id}"
    svg = write_svg(report, tmp_path / "chart.svg").read_text()
    assert "req/s ratios on GET /blogs/posts/{id}" in svg
    assert "zerver-otlp / starlette-otel = 4.00" in svg
    assert "starlette /blogs/posts/1" in svg


def _in_round(result: ContenderResult, round_no: int) -> ContenderResult:
    result.round = round_no
    return result


def test_several_rounds_give_each_ratio_per_round_and_their_median(tmp_path: Path) -> None:
    # A slow minute of the machine halves Starlette in round 2 and zerver in round 3:
    # each ratio compares contenders of the same round, and the median is robust to both.
    # p99 latency is compared the same way (lower is better): 8/10, 12/20, 20/10.
    results = [
        _in_round(_served("starlette", 1000, 500, p99_ms=10.0), 1),
        _in_round(_served("zerver", 2000, 700, p99_ms=8.0), 1),
        _in_round(_served("starlette", 500, 250, p99_ms=20.0), 2),
        _in_round(_served("zerver", 2100, 800, p99_ms=12.0), 2),
        _in_round(_served("starlette", 1000, 500, p99_ms=10.0), 3),
        _in_round(_served("zerver", 1000, 300, p99_ms=20.0), 3),
    ]
    assert round_ratios(results) == {
        "/items/{id}": {"zerver / starlette": [2.0, 4.2, 1.0]},
        "/blogs/posts/{id}": {"zerver / starlette": [1.4, 3.2, 0.6]},
    }
    p99_rounds = round_ratios(results, "p99_ms")
    assert p99_rounds["/blogs/posts/{id}"] == {"zerver / starlette": [0.8, 0.6, 2.0]}
    got = ratios(results)
    assert got == {
        "/items/{id}": {"zerver / starlette": 2.0},
        "/blogs/posts/{id}": {"zerver / starlette": 1.4},
    }
    report = Report(
        started="2026-01-01T00:00:00+00:00",
        elapsed_s=3.0,
        machine={"cpus": 2},
        config={"rounds": 3},
        contenders=results,
        ratios=got,
        ratio_rounds=round_ratios(results),
        p99_ratios=median_ratios(p99_rounds),
        p99_ratio_rounds=p99_rounds,
    )
    assert report.rounds == 3
    lines = ratio_lines(report)
    assert lines[1] == (
        "req/s ratios on GET /blogs/posts/{id}: "
        "zerver / starlette = 1.40 (rounds: 1.40, 3.20, 0.60)"
    )
    assert lines[3] == (
        "p99 ratios on GET /blogs/posts/{id} (lower is better): "
        "zerver / starlette = 0.80 (rounds: 0.80, 0.60, 2.00)"
    )
    table = format_table(report)
    assert table.endswith("\n".join(lines))
    assert "| zerver #2 | /blogs/posts/1 | 800 |" in table
    assert "| starlette #3 | /items/42 | 1,000 |" in table
    saved = json.loads(write_results(report, tmp_path).read_text())
    assert saved["ratio_rounds"]["/items/{id}"]["zerver / starlette"] == [2.0, 4.2, 1.0]
    assert saved["p99_ratios"]["/blogs/posts/{id}"]["zerver / starlette"] == 0.8
    assert saved["p99_ratio_rounds"]["/items/{id}"]["zerver / starlette"] == [0.8, 0.6, 2.0]
    assert [c["round"] for c in saved["contenders"]] == [1, 1, 2, 2, 3, 3]
    svg = write_svg(report, tmp_path / "chart.svg").read_text()
    assert "zerver #3 /items/42" in svg and "(rounds: 2.00, 4.20, 1.00)" in svg
    assert "p99 ratios on GET /items/{id} (lower is better)" in svg


def test_rounds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.__main__ import main

    assert main(["--rounds", "0", "--only", "zerver"]) == 2
    assert "--rounds must be positive" in capsys.readouterr().err


def test_ratios_skip_pairs_that_did_not_both_run() -> None:
    assert ratios([_served("zerver", 2000, 1500), _served("floor-anyio", 3000)]) == {}
    assert ratios([_served("zerver", 2000, 1500), _served("starlette", 1000)]) == {
        "/items/{id}": {"zerver / starlette": 2.0}
    }


def test_server_log_problems_are_problems_not_zero_counters(tmp_path: Path) -> None:
    """A closing line that counts nothing lost is not reported; a count above zero,
    a warning, or a plain traceback is."""
    from loadtest._runner import _log_problems

    log = tmp_path / "server.log"
    quiet = [
        {"event": "consumer stopped", "level": "info", "received": 0, "lost": 0},
        {"event": "trace export stopped", "level": "info", "records_lost": 0, "spans_dropped": {}},
        {"event": "server started", "level": "info", "port": 8000},
    ]
    loud = [
        {"event": "trace export stopped", "level": "info", "records_lost": 3, "spans_dropped": {}},
        {
            "event": "trace export stopped",
            "level": "info",
            "records_lost": 0,
            "spans_dropped": {"queue_full": 2},
        },
        {"event": "collector unreachable", "level": "warning"},
    ]
    lines = [json.dumps(e) for e in quiet + loud] + ["Traceback (most recent call last):"]
    log.write_text("\n".join(lines) + "\n")
    problems = _log_problems(log)
    assert problems == [json.dumps(e) for e in loud] + ["Traceback (most recent call last):"]
