"""Log lines carry the trace, span and request ids of the work that logged them."""

from __future__ import annotations

import io
import logging
from typing import Any

import orjson
import pytest
import structlog

from zerver import App, Context, DbGet, Done, JobContext, Need, Response, load_settings, step
from zerver.testing import AppClient, FakeInterpreter, InMemorySpanSink, capture_logs
from zerver.trace._logging import AccessLog, configure_logging

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
        _remove_root_handler()


def _remove_root_handler() -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if type(h).__name__ == "_StdlibHandler"]:
        root.removeHandler(h)
    root.setLevel(logging.WARNING)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_standard_library_lines_come_out_in_the_same_format(fmt: str) -> None:
    out = io.StringIO()
    old = structlog.get_config()
    try:
        configure_logging(fmt, "info", stream=out)
        structlog.get_logger("zerver").info("from structlog", n=1)
        logging.getLogger("asyncio").error("Task exception was never retrieved %s", "x")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("some.library").exception("library failed")
        # httpx logs each request at INFO: kept at WARNING unless the level is debug.
        logging.getLogger("httpx").info("HTTP Request: GET http://example/ 200")
        logging.getLogger("httpx").warning("httpx warned")
        text = out.getvalue()
        if fmt == "json":
            lines = [orjson.loads(line) for line in text.splitlines()]
            by_event = {line["event"]: line for line in lines}
            assert by_event["from structlog"]["level"] == "info"
            line = by_event["Task exception was never retrieved x"]
            assert (line["level"], line["logger"]) == ("error", "asyncio")
            assert "timestamp" in line
            failed = by_event["library failed"]
            assert failed["logger"] == "some.library" and "ValueError: boom" in failed["exception"]
            assert "httpx warned" in by_event
            assert not [x for x in lines if x["event"].startswith("HTTP Request")]
        else:
            assert "Task exception was never retrieved x" in text and "[error" in text
            assert "ValueError: boom" in text and "httpx warned" in text
            assert "HTTP Request" not in text
    finally:
        structlog.configure(**old)
        structlog.reset_defaults()
        _remove_root_handler()


async def test_lines_logged_by_the_standard_library_inside_a_request_carry_its_span() -> None:
    out = io.StringIO()
    old = structlog.get_config()
    app = App("logs", settings=load_settings({}))

    @step
    def speak(ctx: Context) -> Done:
        logging.getLogger("some.library").warning("inside")
        return Done(Response.text("ok"))

    app.get("/s", speak)
    try:
        configure_logging("json", "info", stream=out)
        async with AppClient(app) as c:
            await c.get("/s", headers=[("x-request-id", "req-7")])
        (line,) = [orjson.loads(x) for x in out.getvalue().splitlines() if "inside" in x]
        assert line["request_id"] == "req-7" and len(line["trace_id"]) == 32
    finally:
        structlog.configure(**old)
        structlog.reset_defaults()
        _remove_root_handler()
