"""Log lines carry the trace, span and request ids of the work that logged them."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
import structlog

from zerver import App, Context, DbGet, Done, JobContext, Need, Response, load_settings, step
from zerver._logging import AccessLog, configure_logging
from zerver.testing import AppClient, FakeInterpreter, InMemorySpanSink, capture_logs

pytestmark = pytest.mark.anyio

log = structlog.get_logger("test.app")


class LoggingFake(FakeInterpreter):
    async def perform(self, effect: Any, job: JobContext) -> Any:
        log.info("interpreter working", effect=effect.span_name)
        return await super().perform(effect, job)


async def test_lines_carry_the_active_span() -> None:
    app = App("logs", settings=load_settings({}))
    fake = LoggingFake(app.clock)
    fake.on("db.get t", result=1)
    app.interpreter("db", fake)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    app.subscribe(AccessLog())

    @step
    def ask(ctx: Context) -> Need:
        log.info("in step")
        return Need(DbGet(table="t", key="k"), then=answer)

    @step
    def answer(ctx: Context) -> Done:
        log.info("in continuation")
        return Done(Response.text("ok"))

    app.get("/l", ask)
    with capture_logs() as lines:
        async with AppClient(app) as c:
            await c.get("/l", headers=[("x-request-id", "req-42")])
        log.info("outside any request")
    spans = {s.name: s for s in sink.traces[0]}
    by_event = {line["event"]: line for line in lines}
    trace_id = f"{spans['step.ask'].trace_id:032x}"
    expect = {
        "in step": spans["step.ask"],
        "interpreter working": spans["db.get t"],
        "in continuation": spans["step.answer.resume"],
        "request": spans["http.server: GET /l"],
    }
    for event, span in expect.items():
        line = by_event[event]
        assert line["trace_id"] == trace_id, event
        assert line["span_id"] == f"{span.span_id:016x}", event
        assert line["request_id"] == "req-42", event
    assert "trace_id" not in by_event["outside any request"]


def test_json_and_console_renderers() -> None:
    out = io.StringIO()
    old = structlog.get_config()
    try:
        configure_logging("json", "info", stream=out)
        structlog.get_logger("x").info("hello", n=1)
        structlog.get_logger("x").debug("hidden")
        line = orjson.loads(out.getvalue().strip())
        assert line["event"] == "hello" and line["n"] == 1 and line["level"] == "info"
        out2 = io.StringIO()
        configure_logging("console", "debug", stream=out2)
        structlog.get_logger("x").debug("shown")
        assert "shown" in out2.getvalue()
        out3 = io.StringIO()
        configure_logging("auto", "info", stream=out3)  # a StringIO is not a TTY: JSON
        structlog.get_logger("x").info("auto")
        assert orjson.loads(out3.getvalue().strip())["event"] == "auto"
    finally:
        structlog.configure(**old)
        structlog.reset_defaults()
