"""The trace engine: tree, names, status policy, trace context, resource, promotion."""

from __future__ import annotations

import random
from typing import Any

import pytest
from support import app_with_fake_db

from zerver import (
    App,
    CacheGet,
    Context,
    DbGet,
    Done,
    EffectError,
    Fail,
    Need,
    Response,
    Slot,
    VirtualClock,
    load_settings,
    step,
)
from zerver.export._spans import SpanData, SpanEvent, SpanKind, StatusCode
from zerver.testing import AppClient, FakeInterpreter, InMemorySpanSink
from zerver.trace import JobState, RequestRecord, StepRecord
from zerver.trace._tracing import TraceEngine, default_resource

pytestmark = pytest.mark.anyio

A: Slot[Any] = Slot("a")


def build_app(**settings: Any) -> tuple[App, FakeInterpreter, InMemorySpanSink]:
    app, _clock, fake = app_with_fake_db("svc", load_settings({}, **settings), rng=random.Random(3))
    app.interpreter("cache", fake)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    return app, fake, sink


@step
def show(ctx: Context) -> Done:
    return Done(Response.text("ok"))


def by_name(spans: list[SpanData]) -> dict[str, SpanData]:
    return {s.name: s for s in spans}


async def test_status_policy_root_4xx_unset_5xx_error() -> None:
    app, _fake, sink = build_app()

    @step
    def teapot(ctx: Context) -> Fail:
        return Fail(418, "short and stout")

    @step
    def unavailable(ctx: Context) -> Fail:
        return Fail(503, "down")

    @step
    def boom(ctx: Context) -> Done:
        raise ValueError("bad")

    app.get("/418", teapot)
    app.get("/503", unavailable)
    app.get("/boom", boom)
    async with AppClient(app) as c:
        await c.get("/418")
        await c.get("/503")
        await c.get("/boom")
        await c.get("/missing")
    t418, t503, tboom, t404 = (t[0] for t in sink.traces)
    assert t418.status_code == StatusCode.UNSET and t418.name == "http.server: GET /418"
    assert t503.status_code == StatusCode.ERROR
    assert tboom.status_code == StatusCode.ERROR
    assert tboom.attributes["error.type"] == "ValueError"
    assert isinstance(tboom.attributes["zerver.error_id"], str)
    step_span = by_name(list(sink.traces[2]))["step.boom"]
    assert (
        step_span.status_code == StatusCode.ERROR
        and step_span.attributes["error.type"] == "ValueError"
    )
    fail_step = by_name(list(sink.traces[0]))["step.teapot"]
    assert fail_step.status_code == StatusCode.UNSET  # an application Fail is not an error
    assert t404.name == "http.server: GET" and t404.status_code == StatusCode.UNSET
    assert "http.route" not in t404.attributes


@pytest.mark.parametrize(
    ("required", "fails", "expected"),
    [
        (True, False, StatusCode.OK),
        (False, False, StatusCode.OK),
        (True, True, StatusCode.ERROR),
        (False, True, StatusCode.UNSET),
    ],
)
async def test_effect_status_policy(required: bool, fails: bool, expected: int) -> None:
    app, fake, sink = build_app()
    if fails:
        fake.on("db.get t", error=EffectError("nope", kind="db_error"))
    else:
        fake.on("db.get t", result=1)

    @step
    def ask(ctx: Context) -> Need:
        return Need(DbGet(table="t", key="k", slot=A, required=required), then=show)

    app.get("/e", ask)
    async with AppClient(app) as c:
        await c.get("/e")
    spans = by_name(list(sink.traces[-1]))
    eff = spans["db.get t"]
    assert eff.kind == SpanKind.CLIENT
    assert eff.status_code == expected
    assert eff.parent_span_id == spans["step.ask"].span_id
    if fails:
        assert eff.attributes["error.type"] == "db_error"
        assert any(name == "zerver.job.failed" for name, *_ in eff.events)
    else:
        assert any(name == "zerver.job.completed" for name, *_ in eff.events)


async def test_cancelled_effect_is_unset_and_closed() -> None:
    app, fake, sink = build_app()
    fake.on("db.get a", error=EffectError("x", kind="db_error"))
    fake.on("db.get b", result=1)

    @step
    def ask(ctx: Context) -> Need:
        return Need([DbGet(table="a", key="k"), DbGet(table="b", key="k")], then=show)

    app.get("/c", ask)
    async with AppClient(app) as c:
        await c.get("/c")
    b = by_name(list(sink.traces[-1]))["db.get b"]
    assert b.status_code == StatusCode.UNSET and b.end_ns >= b.start_ns
    assert b.attributes["error.type"] == "cancelled"


async def test_continues_incoming_traceparent() -> None:
    app, fake, sink = build_app()
    fake.on("db.get t", result=1)
    app.get("/x", show)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with AppClient(app) as c:
        await c.get("/x", headers=[("traceparent", tp), ("tracestate", "congo=t61rcWkgMzE")])
        await c.get(
            "/x",
            headers=[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")],
        )
        await c.get("/x", headers=[("traceparent", "garbage")])
    assert len(sink.traces) == 2  # the unsampled one is not exported
    root = sink.traces[0][0]
    assert root.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert root.parent_span_id == 0xB7AD6B7169203331
    assert root.trace_state == "congo=t61rcWkgMzE"
    assert root.flags & 0x01 and root.flags & 0x100 and root.flags & 0x200
    assert root.attributes["zerver.request_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert all(s.trace_id == root.trace_id for s in sink.traces[0])
    fresh = sink.traces[1][0]
    assert fresh.trace_id != root.trace_id and fresh.parent_span_id == 0
    assert fresh.flags & 0x200 == 0


async def test_span_ids_unique_and_parents_resolve() -> None:
    app, fake, sink = build_app(debug_jobs=True)
    fake.on("db.get t", result=1, parks=[("io_wait", 1, "x")])
    fake.on("cache.get c", result=2)

    @step
    def ask(ctx: Context) -> Need:
        return Need([DbGet(table="t", key="k"), CacheGet(namespace="c", key="k")], then=show)

    app.get("/p", ask)
    async with AppClient(app) as c:
        await c.get("/p")
    spans = list(sink.traces[-1])
    ids = [s.span_id for s in spans]
    assert len(set(ids)) == len(ids) and 0 not in ids
    roots = [s for s in spans if s.parent_span_id == 0]
    assert len(roots) == 1
    assert all(s.parent_span_id in set(ids) for s in spans if s is not roots[0])
    for s in spans:  # children start and end inside their parents
        if s.parent_span_id:
            parent = next(p for p in spans if p.span_id == s.parent_span_id)
            assert parent.start_ns <= s.start_ns <= s.end_ns <= parent.end_ns


async def test_semconv_modes_emit_the_right_keys() -> None:
    results = {}
    for mode in ("old", "new", "dup"):
        app, _fake, sink = build_app(semconv=mode)
        app.get("/x", show)
        async with AppClient(app) as c:
            await c.get("/x?a=1", headers=[("user-agent", "ua/1"), ("host", "example.com:8443")])
        results[mode] = sink.traces[0][0].attributes
    new, old, dup = results["new"], results["old"], results["dup"]
    assert new["http.request.method"] == "GET" and "http.method" not in new
    assert new["server.address"] == "example.com" and new["server.port"] == 8443
    assert new["url.query"] == "a=1" and new["url.path"] == "/x"
    assert old["http.method"] == "GET" and "http.request.method" not in old
    assert old["http.target"] == "/x?a=1" and old["http.host"] == "example.com:8443"
    assert old["http.user_agent"] == "ua/1" and "user_agent.original" not in old
    assert set(dup) >= set(new) | set(old)


async def test_semconv_from_otel_opt_in() -> None:
    settings = load_settings({"OTEL_SEMCONV_STABILITY_OPT_IN": "http"})
    assert settings.semconv_mode == "new"
    settings = load_settings({"OTEL_SEMCONV_STABILITY_OPT_IN": "http/dup"})
    assert settings.semconv_mode == "dup"
    settings = load_settings({"ZER_VER_SEMCONV": "old", "OTEL_SEMCONV_STABILITY_OPT_IN": "http"})
    assert settings.semconv_mode == "old"


def test_resource_attributes() -> None:
    res = default_resource(
        "blog",
        "1.2.3",
        {"deployment.environment": "prod", "telemetry.sdk.name": "evil", "x": "y"},
        sdk_version="0.1.0",
    )
    a = res.attributes
    assert a["service.name"] == "blog" and a["service.version"] == "1.2.3"
    assert a["deployment.environment"] == "prod" and a["x"] == "y"
    assert a["telemetry.sdk.name"] == "zerver" and a["telemetry.sdk.language"] == "python"
    assert a["process.runtime.name"] == "cpython"
    for key in ("service.instance.id", "host.name", "process.pid", "process.runtime.version"):
        assert key in a


async def test_service_name_from_env() -> None:
    app = App(
        "svc",
        settings=load_settings(
            {"OTEL_SERVICE_NAME": "blog-api", "OTEL_RESOURCE_ATTRIBUTES": "team=core"}
        ),
    )
    engine = app.trace_to(InMemorySpanSink())
    assert engine.resource.attributes["service.name"] == "blog-api"
    assert engine.resource.attributes["team"] == "core"


async def test_retry_events_and_http_client_attributes() -> None:
    from zerver import HttpGet, RetryPolicy

    app, fake, sink = build_app()
    fake.on(
        "http.get comments",
        result=1,
        note={"http.response.status_code": 200},
        error=EffectError("503", kind="http_5xx", retryable=True),
        fail_times=1,
    )

    @step
    def ask(ctx: Context) -> Need:
        return Need(
            HttpGet(
                url="http://user:pw@api.local:9000/c?token=s3cret",
                name="comments",
                retry=RetryPolicy(max_attempts=2, backoff_ms=4, jitter=0),
            ),
            then=show,
        )

    app.interpreter("http", fake)
    app.get("/h", ask)
    async with AppClient(app) as c:
        await c.get("/h")
    h = by_name(list(sink.traces[-1]))["http.get comments"]
    assert h.attributes["url.full"] == "http://REDACTED:REDACTED@api.local:9000/c?token=REDACTED"
    assert h.attributes["server.address"] == "api.local" and h.attributes["server.port"] == 9000
    assert h.attributes["http.response.status_code"] == 200
    assert h.attributes["job.attempt"] == 2
    names = [name for name, *_ in h.events]
    assert names.index("zerver.retry") < names.index("zerver.job.parked")
    retry = SpanEvent(*h.events[names.index("zerver.retry")])
    assert dict(retry.attributes) == {"attempt": 1, "reason": "http_5xx", "backoff_ms": 4.0}


async def test_route_p95_promotes_outliers_without_threshold() -> None:
    # Thresholds far away: only the route's rolling p95 can promote.
    app, fake, sink = build_app(
        promote_queue_ms=1000, promote_park_ms=1000, metrics_view_route_p95_window="100"
    )
    waits = iter([1.0] * 40 + [9.0])
    fake.on(lambda e: True, result=1)

    @step
    def ask(ctx: Context) -> Need:
        return Need(DbGet(table="t", key="k"), then=show)

    from zerver.runtime._park import JobContext

    original = fake.perform

    async def perform(effect: Any, job: JobContext) -> Any:
        with job.parked("io_wait", "x"):
            fake._advance(next(waits))
        return await original(effect, job)

    fake.perform = perform  # type: ignore[method-assign]
    app.get("/p", ask)
    async with AppClient(app) as c:
        for _ in range(41):
            await c.get("/p")
    promoted = [t for t in sink.traces if any(s.name == "job.park(io_wait)" for s in t)]
    # Samples equal to the p95 (all 1.0 ms) promote once the window is primed; the 9 ms
    # outlier is promoted too. Before MIN_SAMPLES nothing is promoted.
    assert sink.traces[0] not in promoted
    assert sink.traces[-1] in promoted


async def test_otel_api_spans_nest_under_the_step_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("user")
    app, fake, sink = build_app()
    fake.on("db.get t", result=1)

    @step
    def work(ctx: Context) -> Need:
        with tracer.start_as_current_span("user.compute"):
            pass
        return Need(DbGet(table="t", key="k"), then=finish)

    @step
    def finish(ctx: Context) -> Done:
        with tracer.start_as_current_span("user.render"):
            pass
        return Done(Response.text("ok"))

    app.get("/u", work)
    async with AppClient(app) as c:
        await c.get("/u")
    spans = by_name(list(sink.traces[-1]))
    user = {s.name: s for s in exporter.get_finished_spans()}
    compute, render = user["user.compute"], user["user.render"]
    assert compute.context is not None and compute.parent is not None
    assert compute.context.trace_id == spans["step.work"].trace_id
    assert compute.parent.span_id == spans["step.work"].span_id
    assert render.parent is not None
    assert render.parent.span_id == spans["step.finish.resume"].span_id
    provider.shutdown()


def test_every_job_span_carries_the_same_job_attributes() -> None:
    # Effect, continuation and a continuation that never ran (refused by a full
    # queue) each write the job.* attributes in their own dict display.
    clock = VirtualClock()
    rec = RequestRecord(clock)
    rec.start_trace()
    rec.method, rec.route, rec.path, rec.status = "GET", "/r", "/r", 429
    step_rec = StepRecord(
        index=0, name="load", layer="route", sequence=1, reads=(), writes=(), start_ts=0
    )
    step_rec.end_ts, step_rec.decision = 10, "Need"
    rec.steps.append(step_rec)
    effect = JobState(
        index=0, kind="effect", name="db.get t", queue="effects", step_index=0,
        effect=DbGet(table="t", key="k"),
    )  # fmt: skip
    effect.enqueue_ts, effect.take_ts, effect.start_ts, effect.end_ts = 1, 2, 3, 4
    effect.worker, effect.attempts, effect.outcome = 0, 1, "complete"
    refused = JobState(
        index=1, kind="continuation", name="step.show.resume", queue="continuations",
        step_index=0,
    )  # fmt: skip
    refused.enqueue_ts, refused.end_ts, refused.outcome = 5, 5, "fail"
    refused.error_type = "queue_full"
    rec.jobs += [effect, refused]
    rec.finish(429, 0)
    spans = by_name(TraceEngine(InMemorySpanSink()).build(rec))
    job_keys = {k for k in spans["db.get t"].attributes if k.startswith("job.")}
    assert job_keys >= {"job.queue", "job.attempt", "job.queue_wait_ms", "job.park_count"}
    refused_keys = {k for k in spans["step.show.resume"].attributes if k.startswith("job.")}
    assert refused_keys == job_keys - {"job.worker_id"}  # it never had a worker
    assert spans["step.show.resume"].attributes["zerver.resume.fn"] == "show"
    assert spans["step.show.resume"].status_code == StatusCode.ERROR


async def test_console_sink_writes_each_trace_as_an_indented_tree() -> None:
    import io

    from zerver import ConsoleSpanSink

    app, fake, _sink = build_app()
    fake.on("db.get t", result={"v": 1})
    out = io.StringIO()
    app.trace_to(ConsoleSpanSink(out))

    @step(writes=[A])
    def load(ctx: Context) -> Need:
        return Need(DbGet(table="t", key="k", slot=A), then=show)

    @step
    def down(ctx: Context) -> Fail:
        return Fail(503, "down")

    app.get("/x", load)
    app.get("/down", down)
    async with AppClient(app) as c:
        await c.get("/x")
        await c.get("/down")
    lines = out.getvalue().splitlines()
    # One trace per request: a header, the spans indented under their parents, a blank line.
    headers = [i for i, line in enumerate(lines) if line.startswith("trace ")]
    assert headers == [0, lines.index("") + 1]
    assert lines[0].endswith(" spans)") and lines[-1] == ""
    root = lines[1]
    assert root.startswith("  http.server: GET /x  ") and " ms  SERVER  " in root
    assert "ERROR" not in root  # UNSET says nothing
    assert "http.response.status_code=200" in root
    assert any(line.startswith("    step.load  ") and "  INTERNAL" in line for line in lines)
    assert any(line.startswith("      db.get t  ") and "  CLIENT" in line for line in lines)
    down_root = next(line for line in lines if line.startswith("  http.server: GET /down"))
    assert "  SERVER  ERROR: " in down_root
    assert any(line.startswith("    step.down  ") for line in lines)
