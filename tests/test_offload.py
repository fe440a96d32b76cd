"""Tracing in an exporter process: records survive packing, spans arrive, nothing is lost."""

from __future__ import annotations

import contextlib
import marshal
import os
import random
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from support import receiver_env

from zerver import App, load_settings
from zerver.demo import create_app
from zerver.demo._scenarios import SCENARIOS
from zerver.export import OtlpReceiver, SpanData
from zerver.testing import AppClient, InMemorySpanSink, RecordCapture, normalise
from zerver.trace import RequestRecord, TraceEngine
from zerver.trace._offload import ProcessTraceSubscriber, pack_record, unpack_record

pytestmark = pytest.mark.anyio


async def _records_of(
    scenario_name: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[RequestRecord], TraceEngine]:
    """Run a golden scenario and keep its records and its engine."""
    import zerver.demo._scenarios as demo
    from zerver.testing import trace_requests

    captured: list[RequestRecord] = []
    engines: list[TraceEngine] = []

    async def spy(app: App, requests: list[tuple[str, str]], **kw: Any) -> list[SpanData]:
        cap = RecordCapture()
        app.subscribe(cap)
        spans = await trace_requests(app, requests, **kw)
        captured.extend(cap.records)
        engines.extend(s for s in app.runtime.subscribers if isinstance(s, TraceEngine))
        return spans

    monkeypatch.setattr(demo, "trace_requests", spy)
    scenario = next(s for s in SCENARIOS if s.name == scenario_name)
    await scenario.run()
    return captured, engines[0]


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
async def test_packed_records_build_the_same_trace(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, engine = await _records_of(name, monkeypatch)
    assert records
    for record in records:
        packed = marshal.loads(marshal.dumps(pack_record(record)))
        again = unpack_record(packed, random.Random(0))
        # Fresh engines with the same settings, so route statistics match.
        a, b = _engine_like(engine), _engine_like(engine)
        assert normalise(b.build(again)) == normalise(a.build(record))


def _engine_like(engine: TraceEngine) -> TraceEngine:
    """A fresh engine (no route statistics yet) with ``engine``'s settings."""
    fresh = TraceEngine(
        InMemorySpanSink(),
        semconv=engine.semconv,
        resource=engine.resource,
        scope=engine.scope,
        export_job_depth=engine.export_job_depth,
        interpreters=engine._interpreters,
    )
    fresh.promoter.debug = engine.promoter.debug
    return fresh


async def test_exporter_process_delivers_every_trace(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        env = receiver_env(receiver, OTEL_BSP_SCHEDULE_DELAY="20")
        app = create_app(settings=load_settings({}, db_path=str(tmp_path / "p.sqlite3")))
        sub = app.trace_in_process(env)
        assert isinstance(sub, ProcessTraceSubscriber)
        async with AppClient(app) as c:
            for i in range(200):
                r = await c.get(f"/blogs/posts/{1 + i % 3}")
                assert r.status == 200
        stats = sub.stats()
        assert stats["records_submitted"] == 200 and stats["records_dropped"] == 0
        assert stats["records_sent"] == 200, "every batch acknowledged"
        assert stats["exporter"]["built"] == 200
        roots = [s for s in receiver.spans() if s["name"].startswith("http.server:")]
        assert len(roots) == 200
        export = stats["exporter"]["export"]
        assert export["exported"] == len(receiver.spans())
        assert sum(export["dropped"].values()) == 0


async def test_full_buffer_drops_and_counts(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        env = receiver_env(receiver)
        app = create_app(settings=load_settings({}, db_path=str(tmp_path / "d.sqlite3")))
        sub = app.trace_in_process(env)
        sub.max_pending = 0  # every record finds the buffer full
        async with AppClient(app) as c:
            await c.get("/healthz")
            await c.get("/healthz")
        assert sub.stats()["records_dropped"] == 2
        assert sub.stats()["records_sent"] == 0
    await anyio.lowlevel.checkpoint()


def _behind_env(receiver: OtlpReceiver, *, spool: str) -> dict[str, str]:
    """With ``OtlpReceiver(delay_s=0.02)``, a slow backend and a small pipeline: the
    exporter process cannot keep up. ``spool``: its directory, or ``off``."""
    return receiver_env(
        receiver,
        OTEL_BSP_SCHEDULE_DELAY="20",
        OTEL_BSP_MAX_QUEUE_SIZE="128",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="64",
        ZER_VER_EXPORT_SPOOL_DIR=spool,
    )


def _roots(receiver: OtlpReceiver) -> set[str]:
    return {s["traceId"] for s in receiver.spans() if s["name"].startswith("http.server:")}


async def test_an_exporter_that_falls_behind_spools_records_and_delivers_them(
    tmp_path: Path,
) -> None:
    with OtlpReceiver(delay_s=0.02) as receiver:
        env = _behind_env(receiver, spool=str(tmp_path / "spool"))
        app = create_app(settings=load_settings({}, db_path=str(tmp_path / "b.sqlite3")))
        sub = app.trace_in_process(env)
        async with AppClient(app) as c:
            for _ in range(1500):
                assert (await c.get("/healthz")).status == 200
        stats = sub.stats()
        assert len(_roots(receiver)) == 1500
    assert stats["exporter"]["records_spilled"] > 0, "the exporter spooled records"
    assert stats["records_sent"] == 1500
    assert stats["records_lost"] == stats["records_dropped"] == 0
    assert sum(stats["exporter"]["export"]["dropped"].values()) == 0


async def test_an_exporter_that_keeps_dying_leaves_building_to_the_server(
    tmp_path: Path,
) -> None:
    with OtlpReceiver() as receiver:
        env = receiver_env(
            receiver, OTEL_BSP_SCHEDULE_DELAY="20", ZER_VER_EXPORT_SPOOL_DIR=str(tmp_path / "spool")
        )
        app = create_app(settings=load_settings({}, db_path=str(tmp_path / "k.sqlite3")))
        sub = app.trace_in_process(env)
        sub.max_restarts = 0  # the first death within 10 s of starting is one too many
        with structlog.testing.capture_logs() as logs:
            async with AppClient(app) as c:
                for _ in range(100):
                    await c.get("/healthz")
                with anyio.fail_after(20):
                    while not (sub._child is not None and sub._child.ready):
                        await anyio.sleep(0.01)
                pid = sub._child.process.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                with anyio.fail_after(20):
                    while not sub.stats()["fallback"]:
                        await anyio.sleep(0.01)
                for _ in range(100):
                    await c.get("/healthz")
        assert len(_roots(receiver)) == 200
    events = [e["event"] for e in logs]
    assert "exporter process keeps dying; building spans in this process from now on" in events
    stats = sub.stats()
    assert stats["records_lost"] == stats["records_dropped"] == 0


LINUX_IDLE = hasattr(os, "SCHED_IDLE") and os.path.isdir("/proc/self/task")


def _policies(pid: int) -> list[int]:
    """The scheduling policy of each thread of process ``pid``."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            out.append(os.sched_getscheduler(int(tid)))
    return out


def _needs_spare_cpu() -> None:
    """Skip unless the exporter process will use idle priority here."""
    from zerver.trace._cpu_share import spare_cpu_unavailable

    why = spare_cpu_unavailable()
    if why is not None:
        pytest.skip(f"the exporter stays at normal priority here: {why}")


async def _exporter_pid(sub: ProcessTraceSubscriber) -> int:
    with anyio.fail_after(20):
        while not (sub._child is not None and sub._child.ready):
            await anyio.sleep(0.01)
    pid = sub._child.process.pid
    assert pid is not None
    return pid


@pytest.mark.skipif(not LINUX_IDLE, reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize("priority", ["idle", "normal"])
async def test_the_exporter_takes_only_spare_cpu_while_it_keeps_up(
    tmp_path: Path, priority: str
) -> None:
    """Every exporter thread but the reader runs under SCHED_IDLE by default (none with
    ZER_VER_EXPORT_PRIORITY=normal); the counters say so, and every trace arrives."""
    if priority == "idle":
        _needs_spare_cpu()
    with OtlpReceiver() as receiver:
        env = receiver_env(receiver, OTEL_BSP_SCHEDULE_DELAY="20")
        settings_ = load_settings({}, db_path=str(tmp_path / "i.sqlite3"), export_priority=priority)
        app = create_app(settings=settings_)
        sub = app.trace_in_process(env)
        assert isinstance(sub, ProcessTraceSubscriber)
        async with AppClient(app) as c:
            for _ in range(50):
                assert (await c.get("/healthz")).status == 200
            policies = _policies(await _exporter_pid(sub))
        assert len(_roots(receiver)) == 50
    idle = policies.count(os.SCHED_IDLE)
    if priority == "idle":
        assert policies.count(os.SCHED_OTHER) == 1, policies  # the reader
        assert idle == len(policies) - 1 >= 3  # the builder, the encoder, the sender...
    else:
        assert idle == 0, policies
    cpu = sub.stats()["exporter"]["cpu"]
    assert cpu == {"priority": "normal", "spare_first": priority == "idle", "raised": 0}
    # "normal" at the end: the drain at shutdown holds normal priority.


@pytest.mark.skipif(not LINUX_IDLE, reason="SCHED_IDLE is Linux's")
async def test_an_exporter_falling_behind_takes_its_fair_share_of_the_cpu(
    tmp_path: Path,
) -> None:
    """No spool and a slow backend: the intake fills, the exporter's threads return to
    normal priority (counted, logged once) and every trace still arrives."""
    _needs_spare_cpu()
    with OtlpReceiver(delay_s=0.02) as receiver:
        env = _behind_env(receiver, spool="off")
        app = create_app(settings=load_settings({}, db_path=str(tmp_path / "f.sqlite3")))
        sub = app.trace_in_process(env)
        async with AppClient(app) as c:
            for _ in range(600):
                assert (await c.get("/healthz")).status == 200
            pid = await _exporter_pid(sub)
            with anyio.fail_after(20):
                while os.SCHED_IDLE in _policies(pid):
                    await anyio.sleep(0.01)
        assert len(_roots(receiver)) == 600
    stats = sub.stats()
    assert stats["exporter"]["cpu"]["raised"] >= 1
    assert stats["records_lost"] == stats["records_dropped"] == 0
    assert sum(stats["exporter"]["export"]["dropped"].values()) == 0


@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    blobs=st.lists(st.binary(max_size=300), max_size=40),
    seconds=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_server_messages_frame_and_unframe_exactly(
    seq: int, blobs: list[bytes], seconds: float
) -> None:
    from zerver.trace._offload import _BATCH, _STOP, _frame_batch, _frame_stop, _unframe

    assert _unframe(_frame_batch(seq, blobs)) == (_BATCH, seq, blobs)
    assert _unframe(_frame_stop(seconds)) == (_STOP, seconds, None)


def test_a_damaged_message_is_an_error_not_a_wrong_batch() -> None:
    from zerver.trace._offload import _frame_batch, _unframe

    framed = _frame_batch(7, [b"abc", b"defg"])
    with pytest.raises(ValueError, match="truncated"):
        _unframe(framed[:-1])
    with pytest.raises(ValueError, match="unknown"):
        _unframe(b"x" + framed[1:])
