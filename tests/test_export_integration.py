"""zerver's own spans and user OpenTelemetry spans leave through one OTLP pipeline."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import structlog
from demo_process import demo_process

from zerver import ConfigError, Context, Done, Response, load_settings, step
from zerver._telemetry import setup_tracing
from zerver.demo import create_app
from zerver.export import OtlpReceiver
from zerver.export._sinks import PipelineSink
from zerver.testing import AppClient
from zerver.trace import TraceEngine

pytestmark = pytest.mark.anyio


def _env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **extra,
    }


async def test_app_spans_reach_an_otlp_receiver_as_json(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        app = create_app(
            settings=load_settings({}, db_path=str(tmp_path / "x.sqlite3"), export_process="off")
        )
        engine = setup_tracing(app, _env(receiver))
        assert isinstance(engine, TraceEngine) and isinstance(engine.sink, PipelineSink)
        async with AppClient(app) as c:
            for _ in range(5):
                assert (await c.get("/blogs/posts/1")).status == 200
        # Leaving the lifespan drained the pipeline.
        spans = receiver.spans()
        roots = [s for s in spans if s["name"] == "http.server: GET /blogs/posts/{id}"]
        assert len(roots) == 5
        assert receiver.requests[0].content_type == "application/json"
        names = {s["name"] for s in spans}
        assert {"step.load_blog_post_page", "db.get blog_post", "cache.get author_profile"} <= names
        stats = engine.sink.pipeline.stats()
        assert stats.exported == len(spans) and sum(stats.dropped.values()) == 0


def test_tracing_off_and_bad_values() -> None:
    app = create_app(settings=load_settings({}, db_path=":memory:"))
    assert setup_tracing(app, {"OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        setup_tracing(app, {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


@pytest.mark.parametrize(
    ("process", "exporter", "warned"),
    [("off", "otlp", True), ("on", "none", True), ("on", "otlp", False)],
)
async def test_the_exporter_priority_is_said_to_be_ignored_without_an_exporter_process(
    tmp_path: Path, process: str, exporter: str, warned: bool
) -> None:
    app = create_app(
        settings=load_settings({}, db_path=str(tmp_path / "w.sqlite3"), export_process=process)
    )
    with OtlpReceiver() as receiver, structlog.testing.capture_logs() as logs:
        env = _env(receiver, OTEL_TRACES_EXPORTER=exporter, ZER_VER_EXPORT_PRIORITY="normal")
        setup_tracing(app, env)
        async with AppClient(app) as c:  # started and stopped: the pipeline drained
            assert (await c.get("/healthz")).status == 200
    ignored = [e for e in logs if e["event"].startswith("ZER_VER_EXPORT_PRIORITY ignored")]
    assert len(ignored) == (1 if warned else 0)
    if warned:
        assert ignored[0]["log_level"] == "warning"


def test_demo_process_exports_and_drains_on_sigterm(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        env = {
            **os.environ,
            **_env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000"),
            "ZER_VER_DB_PATH": str(tmp_path / "cli.sqlite3"),
            "ZER_VER_ACCESS_LOG": "0",
            "OTEL_SERVICE_NAME": "blog-under-test",
        }
        with demo_process(env, tmp_path) as (proc, port):
            for _ in range(3):
                assert httpx.get(f"http://127.0.0.1:{port}/blogs/posts/2", timeout=5).is_success
            # A 60 s schedule delay: only the shutdown drain can deliver these spans.
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        roots = [s for s in receiver.spans() if s["name"].startswith("http.server: GET")]
        assert len(roots) == 3
        resource = receiver.requests[0].decode()["resourceSpans"][0]["resource"]
        attrs = {a["key"]: a["value"] for a in resource["attributes"]}
        assert attrs["service.name"] == {"stringValue": "blog-under-test"}


async def test_user_otel_spans_leave_through_the_same_pipeline(tmp_path: Path) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from zerver.export import ExportConfig, ExportPipeline, ZerverSpanProcessor

    with OtlpReceiver() as receiver:
        app = create_app(settings=load_settings({}, db_path=str(tmp_path / "u.sqlite3")))
        pipeline = ExportPipeline.from_config(ExportConfig.from_env(_env(receiver)))
        provider = TracerProvider()
        provider.add_span_processor(ZerverSpanProcessor(pipeline, shutdown_pipeline=False))
        tracer = provider.get_tracer("user")

        @step
        def traced(ctx: Context) -> Done:
            with tracer.start_as_current_span("user.work"):
                pass
            return Done(Response.text("ok"))

        app.get("/u", traced)
        app.trace_to(PipelineSink(pipeline))
        async with AppClient(app) as c:
            await c.get("/u")
        spans = {s["name"]: s for s in receiver.spans()}
        assert spans["user.work"]["parentSpanId"] == spans["step.traced"]["spanId"]
        assert spans["user.work"]["traceId"] == spans["step.traced"]["traceId"]
        provider.shutdown()
        del trace


async def test_setup_picks_the_exporter_process_when_asked(tmp_path: Path) -> None:
    from zerver.trace._offload import ProcessTraceSubscriber

    with OtlpReceiver() as receiver:
        app = create_app(
            settings=load_settings({}, db_path=str(tmp_path / "p.sqlite3"), export_process="on")
        )
        sub = setup_tracing(app, _env(receiver))
        assert isinstance(sub, ProcessTraceSubscriber)
        async with AppClient(app) as c:
            assert (await c.get("/healthz")).status == 200
        assert [s["name"] for s in receiver.spans() if not s.get("parentSpanId")] == [
            "http.server: GET /healthz"
        ]
