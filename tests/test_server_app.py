"""The real App behind the real server: demo routes on SQLite, faults, disconnects, the CLI."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from demo_process import demo_process

from zerver import App, Context, Done, load_settings, step
from zerver.demo import SEED_AUTHORS, SEED_POSTS, create_app
from zerver.http._server import ServerConfig, serve
from zerver.testing import InMemorySpanSink, RecordCapture

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def served(app: App) -> AsyncIterator[httpx.AsyncClient]:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            functools.partial(serve, app, ServerConfig(port=0), shutdown=shutdown)
        )
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=5.0
            ) as client:
                yield client
        finally:
            shutdown.set()


async def test_demo_routes_through_the_server(tmp_path: Path) -> None:
    app = create_app(settings=load_settings({}, db_path=str(tmp_path / "d.sqlite3")))
    cap = RecordCapture()
    app.subscribe(cap)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with served(app) as c:
        post = await c.get("/blogs/posts/1")
        again = await c.get("/blogs/posts/1")
        html = await c.get("/blogs/posts/2", params={"format": "html"})
        comments = await c.get("/blogs/posts/1/comments")
        missing = await c.get("/blogs/posts/nope")
        created = await c.post("/blogs/posts", json={"title": "T", "body": "B", "author_id": "ada"})
        bad = await c.post("/blogs/posts", content=b"{oops")
        health = await c.get("/healthz")
        head = await c.head("/healthz")
        wrong = await c.delete("/blogs/posts/1")
        back = await c.get(created.headers["location"])
    assert post.status_code == 200
    assert post.json() == {"post": SEED_POSTS["1"], "author": SEED_AUTHORS["ada"]}
    assert again.json() == post.json()
    assert html.status_code == 200 and "<h1>Parking explained</h1>" in html.text
    assert [x["id"] for x in comments.json()["comments"]] == ["c1", "c2"]
    assert missing.status_code == 404 and missing.json()["key"] == "nope"
    assert created.status_code == 201 and back.json()["post"]["title"] == "T"
    assert bad.status_code == 400 and bad.json()["key"] == "body"
    assert health.json() == {"status": "ok"}
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == health.headers["content-length"]
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
    assert post.headers["x-request-id"] == cap.records[0].request_id
    # Real sockets filled in the connection facts the semantic conventions need.
    rec = cap.records[0]
    assert rec.client_address == "127.0.0.1" and rec.server_port and rec.client_port
    assert rec.user_agent and rec.user_agent.startswith("python-httpx")
    # The first read missed the cache, the second hit it.
    assert rec.jobs[1].result_meta == {"cache.hit": False}
    assert cap.records[1].jobs[1].result_meta == {"cache.hit": True}
    db_get = next(j for j in rec.jobs if j.name == "db.get blog_post")
    assert any(p.cause == "io_wait" for p in db_get.park_episodes)
    root = sink.traces[0][0]
    assert root.attributes["http.response.status_code"] == 200
    assert any(s.attributes.get("db.system") == "sqlite" for s in sink.traces[0])


async def test_raising_step_is_500_and_server_keeps_serving() -> None:
    app = App("faults", settings=load_settings({}, db_path=":memory:"))

    @step
    def boom(ctx: Context) -> Done:
        raise KeyError("missing thing")

    @step
    def fine(ctx: Context) -> Done:
        from zerver import Response

        return Done(Response.text("fine"))

    app.get("/boom", boom)
    app.get("/fine", fine)
    async with served(app) as c:
        r = await c.get("/boom")
        ok = await c.get("/fine")
    assert r.status_code == 500 and len(r.json()["error_id"]) == 16
    assert ok.status_code == 200 and ok.text == "fine"


async def test_client_disconnect_cancels_the_request_jobs() -> None:
    from zerver import DbGet, Need
    from zerver.testing import FakeInterpreter

    app = App("gone", settings=load_settings({}, db_path=":memory:"))
    gate = anyio.Event()
    fake = FakeInterpreter(app.clock)
    fake.on("db.get slow", result=1, gate=gate)
    app.interpreter("db", fake)
    cap = RecordCapture()
    app.subscribe(cap)

    @step
    def slow(ctx: Context) -> Need:
        return Need(DbGet(table="slow", key="k", timeout_ms=10_000))

    app.get("/slow", slow)
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            functools.partial(serve, app, ServerConfig(port=0), shutdown=shutdown)
        )
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        with anyio.fail_after(5):
            await anyio.wait_all_tasks_blocked()  # the job now waits on the gate
        assert fake.performed
        await stream.aclose()
        with anyio.fail_after(5):
            await anyio.wait_all_tasks_blocked()  # the server saw EOF and cancelled
        shutdown.set()
    rec = cap.last
    assert rec.status == 499
    assert rec.jobs[0].outcome == "cancel"


def test_demo_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "ZER_VER_DB_PATH": str(tmp_path / "cli.sqlite3"),
        "OTEL_TRACES_EXPORTER": "none",
    }
    with demo_process(env, tmp_path) as (proc, port):
        r = httpx.get(f"http://127.0.0.1:{port}/blogs/posts/3", timeout=5)
        assert r.status_code == 200 and r.json()["post"]["title"] == "Promotion thresholds"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout is not None
        access = [orjson.loads(x) for x in proc.stdout.read().splitlines() if x.strip()]
    lines = [a for a in access if a.get("event") == "request"]
    assert lines and lines[0]["route"] == "/blogs/posts/{id}" and lines[0]["status"] == 200
    assert {"method", "duration_ms", "request_id"} <= set(lines[0])


def test_bad_configuration_stops_start_up_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "ZER_VER_DEBUG_JOBS": "perhaps"}
    out = subprocess.run(
        [sys.executable, "-m", "zerver", "demo", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "zerver: ZER_VER_DEBUG_JOBS='perhaps' is invalid: accepted: 0, 1, true, false"
    )
