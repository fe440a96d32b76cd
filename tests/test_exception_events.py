"""A raising step or interpreter records the semantic conventions' ``exception`` event
on its own span, through the exporter process as in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import NothingToOpen, receiver_env

from zerver import App, Context, DbGet, Done, JobContext, Need, Slot, load_settings, step
from zerver.export import OtlpReceiver, attributes_of
from zerver.testing import AppClient, InMemorySpanSink
from zerver.trace._offload import ProcessTraceSubscriber
from zerver.trace._records import MAX_STACKTRACE

pytestmark = pytest.mark.anyio

ROW: Slot[Any] = Slot("row")


class BrokenDb(NothingToOpen):
    """A database interpreter with a bug: it raises something that is not an EffectError."""

    async def perform(self, effect: Any, job: JobContext) -> Any:
        raise KeyError("no column 'titel'")


def _app(settings: dict[str, Any] | None = None) -> App:
    app = App("exc", settings=load_settings({}, **(settings or {})))
    app.interpreter("db", BrokenDb())

    @step
    def explode(ctx: Context) -> Done:
        raise ValueError("the step broke")

    @step(writes=[ROW])
    def load(ctx: Context) -> Need:
        return Need([DbGet(table="post", key="1", slot=ROW)])

    @step
    def deep(ctx: Context) -> Done:
        def down(n: int) -> None:
            if n == 0:
                raise RuntimeError("x" * 5000)
            down(n - 1)

        down(60)
        raise AssertionError("unreachable")

    app.get("/step", explode)
    app.get("/effect", load)
    app.get("/deep", deep)
    return app


def _events(span: dict[str, Any]) -> list[tuple[str, dict[str, object]]]:
    return [(e["name"], attributes_of(e)) for e in span.get("events", ())]


async def test_exception_events_survive_the_exporter_process(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        app = _app({"db_path": str(tmp_path / "x.sqlite3")})
        sub = app.trace_in_process(
            receiver_env(
                receiver, OTEL_BSP_SCHEDULE_DELAY="20", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf"
            )
        )
        assert isinstance(sub, ProcessTraceSubscriber)
        async with AppClient(app) as c:
            assert (await c.get("/step")).status == 500
            assert (await c.get("/effect")).status == 500
        assert sub.stats()["exporter"]["built"] == 2
        spans = {s["name"]: s for s in receiver.spans()}

    step_events = _events(spans["step.explode"])
    assert [name for name, _ in step_events] == ["exception"]
    attrs = step_events[0][1]
    assert attrs["exception.type"] == "ValueError"
    assert attrs["exception.message"] == "the step broke"
    stack = str(attrs["exception.stacktrace"])
    assert stack.startswith("Traceback (most recent call last):")
    assert "in explode" in stack and stack.rstrip().endswith("ValueError: the step broke")

    effect = spans["db.get post"]
    names = [name for name, _ in _events(effect)]
    # On the effect's own span, just before the job's end.
    assert names[-2:] == ["exception", "zerver.job.failed"]
    exc = dict(_events(effect))["exception"]
    assert exc["exception.type"] == "KeyError"
    assert exc["exception.message"] == "\"no column 'titel'\""
    assert "in perform" in str(exc["exception.stacktrace"])
    # Not on the root or the step that asked for the effect.
    assert "exception" not in [n for n, _ in _events(spans["step.load"])]


async def test_stack_traces_can_be_left_out() -> None:
    app = _app({"trace_exception_stacktrace": False})
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with AppClient(app) as c:
        await c.get("/step")
        await c.get("/effect")
    exceptions = [e for s in sink.spans for e in s.events if e[0] == "exception"]
    assert len(exceptions) == 2
    for _, _, attrs, _ in exceptions:
        assert set(attrs) == {"exception.type", "exception.message"}


async def test_stack_traces_and_messages_are_bounded() -> None:
    app = _app()
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with AppClient(app) as c:
        await c.get("/deep")
    (event,) = [e for s in sink.spans for e in s.events if e[0] == "exception"]
    attrs = event[2]
    stack = str(attrs["exception.stacktrace"])
    assert len(stack) <= MAX_STACKTRACE + 64
    assert "characters omitted" in stack
    assert stack.startswith("Traceback (most recent call last):")
    assert stack.rstrip().endswith("x" * 100)  # the innermost part is kept
    assert len(str(attrs["exception.message"])) <= 1024 + 3


def test_the_setting_reads_like_the_other_switches() -> None:
    assert (
        load_settings({"ZER_VER_TRACE_EXCEPTION_STACKTRACE": "0"}).trace_exception_stacktrace
        is False
    )
    assert load_settings({}).trace_exception_stacktrace is True
