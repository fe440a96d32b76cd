"""The sampling decision where traces are built: in process and in the exporter process.

Head-dropped requests are built only when a tail trigger keeps them; every kept
trace's root says why (``zerver.sampling.reason``) once sampling is configured,
and the default configuration adds nothing to the traces.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import receiver_env

from zerver import App, Context, Decision, Done, Response, load_settings, step
from zerver.export import OtlpReceiver, SpanData
from zerver.testing import AppClient, InMemorySpanSink
from zerver.trace._offload import ProcessTraceSubscriber

pytestmark = pytest.mark.anyio


@step
def ok(ctx: Context) -> Decision:
    return Done(Response.text("ok"))


@step
def fail(ctx: Context) -> Decision:
    return Done(Response.text("down", status=503))


def _app(sampler: str | None) -> App:
    env = {} if sampler is None else {"ZER_VER_SAMPLER": sampler}
    app = App("sampling", settings=load_settings(env))
    app.get("/ok", ok)
    app.get("/fail", fail)
    return app


async def _traffic(app: App, oks: int, fails: int) -> None:
    async with AppClient(app) as client:
        for _ in range(oks):
            assert (await client.get("/ok")).status == 200
        for _ in range(fails):
            assert (await client.get("/fail")).status == 503


def _roots(sink: InMemorySpanSink) -> list[SpanData]:
    return [s for s in sink.spans if s.name.startswith("http.server:")]


async def test_head_zero_with_a_tail_trigger_keeps_exactly_the_matching_requests() -> None:
    app = _app("head:0,tail:error")
    sink = InMemorySpanSink()
    engine = app.trace_to(sink)
    await _traffic(app, oks=10, fails=3)
    roots = _roots(sink)
    assert [r.attributes["http.response.status_code"] for r in roots] == [503] * 3
    assert {r.attributes["zerver.sampling.reason"] for r in roots} == {"tail:error"}
    assert all(s.flags & 0x01 for s in sink.spans), "a tail keep is exported as sampled"
    assert engine.unsampled == 10 and engine.built == 3


async def test_head_keeps_say_head_and_the_default_adds_no_attribute() -> None:
    app = _app("head:1,tail:error")
    sink = InMemorySpanSink()
    app.trace_to(sink)
    await _traffic(app, oks=2, fails=1)
    assert [r.attributes["zerver.sampling.reason"] for r in _roots(sink)] == ["head"] * 3

    app = _app(None)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    await _traffic(app, oks=2, fails=1)
    assert len(_roots(sink)) == 3
    assert not [s for s in sink.spans if "zerver.sampling.reason" in s.attributes]


async def test_head_zero_without_triggers_builds_nothing() -> None:
    app = _app("head:0")
    sink = InMemorySpanSink()
    engine = app.trace_to(sink)
    await _traffic(app, oks=4, fails=2)
    assert sink.spans == [] and engine.unsampled == 6


async def test_the_exporter_process_gets_every_record_and_keeps_the_matching_ones(
    tmp_path: Path,
) -> None:
    with OtlpReceiver() as receiver:
        env = receiver_env(
            receiver, OTEL_BSP_SCHEDULE_DELAY="20", ZER_VER_EXPORT_SPOOL_DIR=str(tmp_path / "spool")
        )
        app = _app("head:0,tail:error")
        sub = app.trace_in_process(env)
        assert isinstance(sub, ProcessTraceSubscriber)
        await _traffic(app, oks=20, fails=5)
        stats = sub.stats()
        assert stats["records_submitted"] == 25, "head-dropped records go to the tail sampler"
        assert stats["exporter"]["built"] == 5
        roots = [s for s in receiver.spans() if s["name"].startswith("http.server:")]
        assert len(roots) == 5
        for root in roots:
            attrs = {a["key"]: a["value"] for a in root["attributes"]}
            assert attrs["zerver.sampling.reason"] == {"stringValue": "tail:error"}


async def test_the_exporter_process_is_not_sent_head_dropped_records_without_triggers(
    tmp_path: Path,
) -> None:
    with OtlpReceiver() as receiver:
        env = receiver_env(receiver, ZER_VER_EXPORT_SPOOL_DIR=str(tmp_path / "spool"))
        app = _app("head:0")
        sub = app.trace_in_process(env)
        await _traffic(app, oks=6, fails=1)
        stats = sub.stats()
        assert stats["records_submitted"] == 0 and stats["unsampled"] == 7
        assert receiver.spans() == []
