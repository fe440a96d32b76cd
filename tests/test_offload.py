"""Tracing in an exporter process: records survive packing, spans arrive, nothing is lost."""

from __future__ import annotations

import marshal
import random
from pathlib import Path
from typing import Any

import anyio
import pytest

from zerver import App, RequestRecord, SpanData, TraceEngine, load_settings
from zerver._offload import ProcessTraceSubscriber, pack_record, unpack_record
from zerver.demo import create_app
from zerver.demo._scenarios import SCENARIOS
from zerver.export import OtlpReceiver
from zerver.testing import AppClient, InMemorySpanSink, RecordCapture, normalise

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
        engines.extend(s for s in app._subscribers if isinstance(s, TraceEngine))
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
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "20",
        }
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
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}
        app = create_app(settings=load_settings({}, db_path=str(tmp_path / "d.sqlite3")))
        sub = app.trace_in_process(env)
        sub.max_pending = 0  # every record finds the buffer full
        async with AppClient(app) as c:
            await c.get("/healthz")
            await c.get("/healthz")
        assert sub.stats()["records_dropped"] == 2
        assert sub.stats()["records_sent"] == 0
    await anyio.lowlevel.checkpoint()
