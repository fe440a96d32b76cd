"""The trace pages over real HTTP: summary, samples, waterfall, pipeline, escaping, access."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from support import served

from zerver import App, load_settings
from zerver.demo import create_app
from zerver.export._sinks import InMemorySpanSink

pytestmark = pytest.mark.anyio

ROOT = "http.server: GET /blogs/posts/{id}"


def demo(tmp_path: Path, **env: str) -> App:
    return create_app(
        settings=load_settings(
            {
                "ZER_VER_ZPAGES": "on",
                "ZER_VER_DB_PATH": str(tmp_path / "demo.sqlite3"),
                "ZER_VER_PROMOTE_QUEUE_MS": "0",
                **env,
            }
        )
    )


async def raw_get(base: str, target: str, *, local_host: str | None = None) -> tuple[int, bytes]:
    """GET ``target`` byte for byte (no client-side quoting), optionally from ``local_host``."""
    host, port = base.removeprefix("http://").split(":")
    async with await anyio.connect_tcp(host, int(port), local_host=local_host) as s:
        await s.send(f"GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        data = b""
        with anyio.fail_after(10):
            while True:
                try:
                    data += await s.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def traffic(c: httpx.AsyncClient, base: str, n: int = 4) -> None:
    for i in range(n):
        assert (await c.get(f"{base}/blogs/posts/{i % 2 + 1}")).status_code == 200


async def test_summary_counts_each_span_name_and_links_every_count(tmp_path: Path) -> None:
    app = demo(tmp_path)
    async with served(app) as base, httpx.AsyncClient() as c:
        await traffic(c, base)
        data = (await c.get(f"{base}/debug/tracez/api/summary")).json()
        assert data["process"]["pid"] == os.getpid()
        assert data["requests"] == 4 and data["running"] == 0
        rows = {r["name"]: r for r in data["spans"]}
        assert sum(rows[ROOT]["latency"]) == 4 and rows[ROOT]["errors"] == 0
        assert sum(rows["db.get blog_post"]["latency"]) == 4
        page = await c.get(f"{base}/debug/tracez")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert "Answered by process" in page.text and str(os.getpid()) in page.text
        links = re.findall(r'<a href="(/debug/tracez\?[^"]+)">(\d+)</a>', page.text)
        linked = sum(int(n) for _href, n in links)
        assert linked == sum(sum(r["latency"]) + r["errors"] + r["running"] for r in rows.values())
        # Each link opens a page listing that cell's samples.
        href, count = next((h, n) for h, n in links if "db.get+blog_post" in h or "db.get%20" in h)
        samples_page = await c.get(base + href.replace("&amp;", "&"))
        assert 1 <= samples_page.text.count('class=trace href="/debug/traces/') <= int(count)


async def test_samples_and_waterfall_api(tmp_path: Path) -> None:
    # One effect worker: the request's task takes it for the post's read, and the
    # author's cache read waits in the queue meanwhile, a queue wait to show.
    app = demo(tmp_path, ZER_VER_WORKERS_EFFECTS="1")
    async with served(app) as base, httpx.AsyncClient() as c:
        await traffic(c, base, 3)
        rows = (await c.get(f"{base}/debug/tracez/api/summary")).json()["spans"]
        root = next(r for r in rows if r["name"] == ROOT)
        bucket = next(i for i, n in enumerate(root["latency"]) if n)
        got = await c.get(
            f"{base}/debug/tracez/api/samples",
            params={"name": ROOT, "kind": "latency", "bucket": str(bucket)},
        )
        samples = got.json()["samples"]
        # One sample per bucket per 10 ms at most: the first request is always kept.
        assert 1 <= len(samples) <= root["latency"][bucket]
        s = samples[0]
        assert s["route"] == "/blogs/posts/{id}" and s["status"] == 200 and s["span"] == "root"
        assert s["sampled"] is True and s["sampling_reason"] is None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", s["start"])
        trace = (await c.get(f"{base}/debug/tracez/api/traces/{s['trace_id']}")).json()
        spans = trace["spans"]
        assert spans[0]["name"] == ROOT and spans[0]["depth"] == 0
        assert spans[0]["attributes"]["http.route"] == "/blogs/posts/{id}"
        names = [x["name"] for x in spans]
        assert "db.get blog_post" in names and "job.queue_wait" in names  # promoted at 0 ms
        db = next(x for x in spans if x["name"] == "db.get blog_post")
        assert "run" in [seg["phase"] for seg in db["segments"]]
        cache = next(x for x in spans if x["name"] == "cache.get author_profile")
        assert cache["segments"][0]["phase"] == "queue_wait"
        for x in (db, cache):
            assert all(seg["start_ms"] <= seg["end_ms"] for seg in x["segments"])
        parents = {x["span_id"] for x in spans}
        assert all(x["parent_span_id"] in parents for x in spans[1:])
        # Building twice gives the same tree (promoted ids included).
        again = (await c.get(f"{base}/debug/tracez/api/traces/{s['trace_id']}")).json()
        assert again["spans"] == spans
        page = await c.get(f"{base}/debug/traces/{s['trace_id']}")
        assert page.status_code == 200
        assert page.text.count('<div class=bar data-name="') == len(spans)
        assert 'class="seg queue_wait"' in page.text
        for err in ("kind=latency", "kind=latency&bucket=x", "kind=nope", ""):
            bad = await c.get(f"{base}/debug/tracez/api/samples?name=x&{err}")
            assert bad.status_code == 400
        for tid in ("0" * 32, "f" * 32, "xyz", "a" * 33):
            assert (await c.get(f"{base}/debug/tracez/api/traces/{tid}")).status_code == 404
            assert (await c.get(f"{base}/debug/traces/{tid}")).status_code == 404


async def test_a_hostile_path_renders_as_text(tmp_path: Path) -> None:
    app = demo(tmp_path)
    async with served(app) as base, httpx.AsyncClient() as c:
        status, _ = await raw_get(base, "/x<script>alert(1)</script>\"'&")
        assert status == 404
        rows = (await c.get(f"{base}/debug/tracez/api/summary")).json()["spans"]
        (row,) = [r for r in rows if r["name"] == "http.server: GET"]
        bucket = next(i for i, n in enumerate(row["latency"]) if n)
        page = await c.get(
            f"{base}/debug/tracez",
            params={"name": "http.server: GET", "kind": "latency", "bucket": str(bucket)},
        )
        assert "<script>alert" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in page.text
        tid = re.search(r"/debug/traces/([0-9a-f]{32})", page.text)
        assert tid is not None
        waterfall = await c.get(f"{base}/debug/traces/{tid.group(1)}")
        assert "<script>alert" not in waterfall.text
        # The only script is the package's own file.
        assert re.findall(r"<script[^>]*>", waterfall.text) == [
            '<script src="/debug/tracez/static/zpages.js" defer>'
        ]
        api = await c.get(f"{base}/debug/tracez/api/traces/{tid.group(1)}")
        assert api.json()["spans"][0]["attributes"]["url.path"].startswith("/x<script>")
        assert api.headers["content-type"] == "application/json"


async def test_debug_routes_are_neither_traced_nor_counted(tmp_path: Path) -> None:
    app = demo(tmp_path)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with served(app) as base, httpx.AsyncClient() as c:
        await traffic(c, base, 1)
        before = len(sink.traces)
        for path in (
            "/debug/tracez",
            "/debug/tracez/api/summary",
            "/debug/pipeline",
            "/debug/tracez/static/zpages.js",
            "/debug/tracez/static/zpages.css",
        ):
            assert (await c.get(base + path)).status_code == 200, path
        assert len(sink.traces) == before
        assert (await c.get(f"{base}/debug/tracez/api/summary")).json()["requests"] == 1
        assert (await c.get(f"{base}/debug/tracez/static/other.js")).status_code == 404
        post = await c.post(f"{base}/debug/tracez")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


async def test_pipeline_page_shows_what_this_process_exports(tmp_path: Path) -> None:
    app = demo(tmp_path)
    async with served(app) as base, httpx.AsyncClient() as c:
        off = (await c.get(f"{base}/debug/tracez/api/pipeline")).json()
        assert off["exporting"] is False and "tracez still shows" in off["note"]
    from zerver.export import ExportPipeline
    from zerver.export._sinks import PipelineSink

    app = demo(tmp_path)
    exported = InMemorySpanSink()
    pipeline = ExportPipeline(exported)
    app.trace_to(PipelineSink(pipeline, drain_timeout_s=5))
    async with served(app) as base, httpx.AsyncClient() as c:
        await traffic(c, base, 2)
        data: dict[str, Any] = (await c.get(f"{base}/debug/tracez/api/pipeline")).json()
        (pipe,) = data["pipelines"]
        assert pipe["where"] == "this process" and pipe["traces_built"] == 2
        export = pipe["export"]
        for key in ("exported", "dropped", "retries", "breaker_state", "queue_depth"):
            assert key in export
        page = await c.get(f"{base}/debug/pipeline")
        assert "breaker_state" in page.text and "queue_depth" in page.text


async def test_off_means_the_app_answers_as_without_pages(tmp_path: Path) -> None:
    app = demo(tmp_path, ZER_VER_ZPAGES="off")
    assert app._zpages is None
    async with served(app) as base, httpx.AsyncClient() as c:
        got = await c.get(f"{base}/debug/tracez")
        assert got.status_code == 404 and got.json() == {"error": "not found"}


async def test_pages_live_under_the_configured_path(tmp_path: Path) -> None:
    app = demo(tmp_path, ZER_VER_ZPAGES_PATH="/_ops/z")
    async with served(app) as base, httpx.AsyncClient() as c:
        assert (await c.get(f"{base}/debug/tracez")).status_code == 404
        page = await c.get(f"{base}/_ops/z/tracez")
        assert page.status_code == 200 and 'href="/_ops/z/tracez/static/zpages.css"' in page.text
        # A path under the prefix that is no page is the app's.
        assert (await c.get(f"{base}/_ops/z/other")).json() == {"error": "not found"}


async def test_a_client_outside_the_allow_list_gets_the_apps_404(tmp_path: Path) -> None:
    app = demo(tmp_path)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with served(app) as base:
        status, body = await raw_get(base, "/debug/tracez", local_host="127.0.0.1")
        assert status == 200 and b"<h1>tracez</h1>" in body
        # 127.0.0.2 is on the loopback interface but is not "loopback" here.
        status, body = await raw_get(base, "/debug/tracez", local_host="127.0.0.2")
        assert (status, body) == (404, b'{"error":"not found"}')
        status, body = await raw_get(base, "/debug/tracez/api/summary", local_host="127.0.0.2")
        assert (status, body) == (404, b'{"error":"not found"}')
    # Answered as any unknown path is: traced like one, no hint of the pages.
    assert [t[0].name for t in sink.traces] == ["http.server: GET", "http.server: GET"]
    allowed = demo(tmp_path, ZER_VER_ZPAGES_ALLOW="127.0.0.2/32")
    async with served(allowed) as base:
        status, body = await raw_get(base, "/debug/tracez", local_host="127.0.0.2")
        assert status == 200 and b"<h1>tracez</h1>" in body
        status, _ = await raw_get(base, "/debug/tracez", local_host="127.0.0.3")
        assert status == 404


async def test_pages_never_show_what_the_export_path_redacts(tmp_path: Path) -> None:
    app = demo(
        tmp_path,
        ZER_VER_REDACT_QUERY_PARAMS="token",
        OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="12",
    )
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with served(app) as base, httpx.AsyncClient() as c:
        got = await c.get(
            f"{base}/blogs/posts/1?token=s3cr3t&page=2", headers={"user-agent": "A" * 40}
        )
        assert got.status_code == 200
        (exported,) = sink.traces
        sample = (
            await c.get(f"{base}/debug/tracez/api/samples", params={"name": ROOT, "kind": "error"})
        ).json()
        assert sample["samples"] == []
        rows = (await c.get(f"{base}/debug/tracez/api/summary")).json()["spans"]
        root = next(r for r in rows if r["name"] == ROOT)
        bucket = next(i for i, n in enumerate(root["latency"]) if n)
        listed = await c.get(
            f"{base}/debug/tracez", params={"name": ROOT, "kind": "latency", "bucket": str(bucket)}
        )
        tid = f"{exported[0].trace_id:032x}"
        trace = await c.get(f"{base}/debug/tracez/api/traces/{tid}")
        page = await c.get(f"{base}/debug/traces/{tid}")
        for body in (listed.text, trace.text, page.text):
            assert "s3cr3t" not in body
            assert "A" * 13 not in body
        shown = trace.json()["spans"][0]["attributes"]
        assert shown == {
            k: list(v) if isinstance(v, tuple) else v for k, v in exported[0].attributes.items()
        }
