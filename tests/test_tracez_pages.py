"""The trace pages as a user meets them: hostile values stay text, the pages leave the
app's traces, metrics and access log alone, and a response's traceresponse opens its
waterfall."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from zerver import App, Context, Done, Response, VirtualClock, load_settings, step
from zerver.export._sinks import InMemorySpanSink
from zerver.testing import AppClient, capture_logs
from zerver.trace._logging import AccessLog
from zerver.trace._metrics import RecordMetrics

pytestmark = pytest.mark.anyio

HOSTILE = "<script>alert(1)</script>\"'&"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;"
PAGES = (
    "/debug/tracez",
    "/debug/tracez/api/summary",
    "/debug/tracez/api/samples?name=x&kind=error",
    "/debug/pipeline",
    "/debug/tracez/api/pipeline",
    "/debug/tracez/static/zpages.js",
    "/debug/tracez/static/zpages.css",
    "/debug/traces/" + "a" * 32,  # not kept: a 404 of the pages, not the app's
)


@step
def echo(ctx: Context) -> Done:
    return Done(Response.text(ctx.params["name"]))


def app_with(**env: str) -> tuple[App, InMemorySpanSink]:
    app = App(
        "pages", settings=load_settings({"ZER_VER_ZPAGES": "on", **env}), clock=VirtualClock()
    )
    app.get("/hello/{name}", echo)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    return app, sink


def point_counts(reader: InMemoryMetricReader) -> list[int]:
    """The counts of ``http.server.request.duration``'s points (none before a request)."""
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        p.count
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "http.server.request.duration"
        for p in m.data.data_points
        if isinstance(p, HistogramDataPoint)
    ]


def text(body: bytes) -> str:
    return body.decode()


async def test_hostile_query_values_and_headers_render_as_text() -> None:
    app, _sink = app_with()
    async with AppClient(app) as client:
        # A path no route matches, as a raw request line may carry it.
        await client.get(
            "/x" + HOSTILE, headers=[("user-agent", HOSTILE), ("x-request-id", HOSTILE)]
        )
        summary = orjson.loads((await client.get("/debug/tracez/api/summary")).body)
        (row,) = [r for r in summary["spans"] if r["name"] == "http.server: GET"]
        bucket = next(i for i, n in enumerate(row["latency"]) if n)
        # The list of the request with the hostile path and user agent.
        listing = text(
            (
                await client.get(
                    f"/debug/tracez?name={quote(row['name'])}&kind=latency&bucket={bucket}"
                )
            ).body
        )
        assert ESCAPED in listing and "<script>alert" not in listing
        tid = re.search(r"/debug/traces/([0-9a-f]{32})", listing)
        assert tid is not None
        waterfall = text((await client.get(f"/debug/traces/{tid.group(1)}")).body)
        assert "<script>alert" not in waterfall
        # Attributes reach the page only through the API, as data the script writes as text.
        api = orjson.loads((await client.get(f"/debug/tracez/api/traces/{tid.group(1)}")).body)
        attrs: dict[str, Any] = api["spans"][0]["attributes"]
        assert attrs["user_agent.original"] == HOSTILE
        # Values a visitor puts in the pages' own query and path come back as text too.
        for target in (
            f"/debug/tracez?name={quote(HOSTILE)}&kind=error",
            f"/debug/tracez?name={quote(HOSTILE)}&kind=latency&bucket=3",
            f"/debug/tracez?name={quote(HOSTILE)}&kind={quote(HOSTILE)}",
            f"/debug/traces/{quote(HOSTILE)}",
        ):
            got = await client.get(target)
            body = text(got.body)
            assert got.status in (200, 404), target
            assert "<script>alert" not in body, target
            assert re.findall(r"<script[^>]*>", body) == [
                '<script src="/debug/tracez/static/zpages.js" defer>'
            ], target
        samples = await client.get(f"/debug/tracez/api/samples?name={quote(HOSTILE)}&kind=error")
        assert orjson.loads(samples.body)["name"] == HOSTILE  # JSON: data, not markup
        assert samples.headers[0] == ("content-type", "application/json")


async def test_page_views_leave_the_apps_traces_metrics_and_access_log_alone() -> None:
    app, sink = app_with()
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader])
    app.subscribe(RecordMetrics(provider, "dup"))
    app.subscribe(AccessLog())
    active = app.count_active_requests()
    with capture_logs() as logs:
        async with AppClient(app) as client:
            for target in PAGES:
                got = await client.get(target)
                assert got.status == (404 if "/traces/" in target else 200), target
                assert ("x-request-id" not in dict(got.headers)) and (
                    "traceresponse" not in dict(got.headers)
                ), target
            # Nothing counted yet: no trace, no metric point, no access line, not in flight.
            assert len(sink.traces) == 0 and active == {}
            assert point_counts(reader) == []
            assert [e for e in logs if e.get("event") == "request"] == []
            # One request of the app's own: one of each.
            assert (await client.get("/hello/ada")).status == 200
            for target in PAGES:
                await client.get(target)
            summary = orjson.loads((await client.get("/debug/tracez/api/summary")).body)
    assert len(sink.traces) == 1 and summary["requests"] == 1
    assert [e["path"] for e in logs if e.get("event") == "request"] == ["/hello/ada"]
    assert active == {("GET", "http"): 0}
    assert point_counts(reader) == [1]
    provider.shutdown()


async def test_the_traceresponse_header_opens_the_requests_waterfall() -> None:
    app, sink = app_with()
    async with AppClient(app) as client:
        got = await client.get("/hello/grace")
        (value,) = [v for k, v in got.headers if k == "traceresponse"]
        _version, trace_id, span_id, _flags = value.split("-")
        page = await client.get(f"/debug/traces/{trace_id}")
        api = orjson.loads((await client.get(f"/debug/tracez/api/traces/{trace_id}")).body)
    assert page.status == 200 and trace_id in text(page.body)
    root = api["spans"][0]
    assert (api["trace_id"], root["span_id"]) == (trace_id, span_id)
    assert root["name"] == "http.server: GET /hello/{name}"
    # The same ids as the exported trace's server span.
    (exported,) = sink.traces
    assert (f"{exported[0].trace_id:032x}", f"{exported[0].span_id:016x}") == (trace_id, span_id)
