"""Trace context across servers, threads and user spans."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import anyio
import anyio.to_thread
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import NothingToOpen, served

from zerver import (
    App,
    Context,
    Done,
    Effect,
    JobContext,
    Need,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver.demo import create_app
from zerver.export._spans import SpanData, SpanKind
from zerver.testing import AppClient, InMemorySpanSink
from zerver.trace._records import RequestRecord

pytestmark = pytest.mark.anyio

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def named(spans: list[SpanData], name: str) -> SpanData:
    return next(s for s in spans if s.name == name)


async def test_one_trace_across_two_servers(tmp_path: Path) -> None:
    sink = InMemorySpanSink()
    b = create_app(settings=load_settings({}, db_path=str(tmp_path / "b.sqlite3")))
    b.trace_to(sink)
    seen: dict[str, Any] = {}

    @step
    def spy(ctx: Context) -> Any:
        from zerver import Continue

        seen["baggage"] = dict(ctx.baggage)
        seen["tracestate"] = cast(RequestRecord, ctx.record).tracestate
        return Continue

    b.before(spy)
    async with served(b) as b_url:
        a = create_app(
            settings=load_settings({}, db_path=str(tmp_path / "a.sqlite3"), demo_base_url=b_url)
        )
        a.trace_to(sink)
        async with served(a) as a_url, httpx.AsyncClient(timeout=5) as client:
            r = await client.get(
                f"{a_url}/blogs/posts/1/with-comments",
                headers={
                    "traceparent": TP,
                    "tracestate": "vendor=abc",
                    "baggage": "tenant=acme,user.id=42",
                },
            )
    assert r.status_code == 200
    assert [c["id"] for c in r.json()["comments"]] == ["c1", "c2"]
    spans = list(sink.spans)
    a_root = named(spans, "http.server: GET /blogs/posts/{id}/with-comments")
    b_root = named(spans, "http.server: GET /blogs/posts/{id}/comments")
    client_span = named(spans, "http.get comments")
    trace_id = int(TP.split("-")[1], 16)
    assert {s.trace_id for s in spans} == {trace_id}
    assert a_root.parent_span_id == int(TP.split("-")[2], 16)
    assert client_span.kind == SpanKind.CLIENT
    assert client_span.parent_span_id == named(spans, "step.load_post_with_comments").span_id
    assert b_root.kind == SpanKind.SERVER and b_root.parent_span_id == client_span.span_id
    assert b_root.flags & 0x200  # B knows its parent is remote
    assert client_span.attributes["http.response.status_code"] == 200
    assert seen["baggage"] == {"tenant": "acme", "user.id": "42"}
    assert seen["tracestate"] == "vendor=abc"


# The W3C Trace Context test suite's invalid traceparent cases: each is ignored.
INVALID = [
    "",
    "00",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
    "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
]


@step
def hello(ctx: Context) -> Done:
    return Done(Response.json({"baggage": dict(ctx.baggage)}))


@pytest.mark.parametrize("value", INVALID)
async def test_invalid_traceparent_starts_a_new_trace(value: str) -> None:
    app = App("w3c", settings=load_settings({}))
    sink = InMemorySpanSink()
    app.trace_to(sink)
    app.get("/h", hello)
    async with AppClient(app) as c:
        r = await c.get("/h", headers=[("traceparent", value), ("tracestate", "a=b")])
    assert r.status == 200
    root = sink.traces[0][0]
    assert root.trace_id != 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert root.parent_span_id == 0 and root.trace_state == ""


async def test_future_version_with_extra_fields_is_accepted() -> None:
    # W3C: a higher version may carry more fields after the known ones.
    app = App("w3c", settings=load_settings({}))
    sink = InMemorySpanSink()
    app.trace_to(sink)
    app.get("/h", hello)
    async with AppClient(app) as c:
        await c.get(
            "/h",
            headers=[
                ("traceparent", "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
            ],
        )
    assert sink.traces[0][0].trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736


async def test_malformed_baggage_is_ignored() -> None:
    app = App("bag", settings=load_settings({}))
    app.get("/h", hello)
    async with AppClient(app) as c:
        r = await c.get("/h", headers=[("baggage", "=;;,,=x"), ("traceparent", TP)])
    assert r.status == 200


class _Compute(Effect):
    system = "compute"
    operation = "run"


class ThreadedInterpreter(NothingToOpen):
    """Makes one user span on the event loop and one in a worker thread."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        with self.tracer.start_as_current_span("user.interpreter"):
            pass

        def in_thread() -> int:
            with self.tracer.start_as_current_span("user.thread"):
                return 7

        with job.parked("io_wait", "thread"):
            return await anyio.to_thread.run_sync(in_thread)


async def test_user_spans_in_interpreters_and_threads_nest_under_the_effect() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("user")
    app = App("threads", settings=load_settings({}))
    app.interpreter("compute", ThreadedInterpreter(tracer))
    sink = InMemorySpanSink()
    app.trace_to(sink)
    out: Slot[int] = Slot("out")

    @step
    def ask(ctx: Context) -> Need:
        with tracer.start_as_current_span("user.step"):
            pass
        return Need(_Compute(name="job", slot=out), then=show)

    @step
    def show(ctx: Context) -> Done:
        return Done(Response.json(ctx.require(out)))

    app.get("/t", ask)
    async with AppClient(app) as c:
        r = await c.get("/t")
    assert r.body == b"7"
    ours = list(sink.traces[0])
    effect = named(ours, "compute.run job")
    user = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("user.interpreter", "user.thread"):
        parent = user[name].parent
        assert parent is not None and parent.span_id == effect.span_id, name
        assert user[name].context is not None
        assert user[name].context.trace_id == effect.trace_id
    step_parent = user["user.step"].parent
    assert step_parent is not None and step_parent.span_id == named(ours, "step.ask").span_id
    provider.shutdown()
