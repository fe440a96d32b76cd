"""tracez's sample lists say what sampling decided: the reason when this process knows it,
and what a tail decision made in the exporter process means for the column."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from demo_process import operator_env, zerver_process

from zerver import App, Context, Done, Fail, Response, VirtualClock, load_settings, step
from zerver._specs import SamplerSpec
from zerver.export._sinks import InMemorySpanSink
from zerver.testing import AppClient
from zerver.trace._records import RequestRecord
from zerver.zpages._pages import _Sampling

ROOT = "http.server: GET /r/{what}"


@step
def answer(ctx: Context) -> Done | Fail:
    if ctx.params["what"] == "boom":
        return Fail(503, "unavailable")
    return Done(Response.text("ok"))


def app_with(env: dict[str, str]) -> tuple[App, InMemorySpanSink]:
    app = App("s", settings=load_settings({"ZER_VER_ZPAGES": "on", **env}), clock=VirtualClock())
    app.get("/r/{what}", answer)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    return app, sink


async def samples_of(client: AppClient, name: str = ROOT) -> dict[str, Any]:
    """Every kept latency sample of ``name`` (all buckets), and the sampling block."""
    summary = orjson.loads((await client.get("/debug/tracez/api/summary")).body)
    row = next(r for r in summary["spans"] if r["name"] == name)
    found: list[dict[str, Any]] = []
    sampling: dict[str, Any] = {}
    for bucket, count in enumerate(row["latency"]):
        if count:
            got = await client.get(
                f"/debug/tracez/api/samples?name={quote(name)}&kind=latency&bucket={bucket}"
            )
            assert got.status == 200
            data = orjson.loads(got.body)
            found.extend(data["samples"])
            sampling = data["sampling"]
    return {"samples": found, "sampling": sampling, "row": row}


def exported_reasons(sink: InMemorySpanSink) -> dict[str, object]:
    return {
        f"{t[0].trace_id:032x}": t[0].attributes.get("zerver.sampling.reason") for t in sink.traces
    }


@pytest.mark.anyio
async def test_without_a_sampler_the_column_says_so_and_traces_carry_no_reason() -> None:
    app, sink = app_with({})
    async with AppClient(app) as client:
        await client.get("/r/a")
        data = await samples_of(client)
    (s,) = data["samples"]
    assert s["sampling_reason"] is None and s["sampling_decision"] == "no_sampler"
    assert data["sampling"]["sampler"] is None and data["sampling"]["tail_decided_in"] is None
    assert "no zerver.sampling.reason" in data["sampling"]["note"]
    assert exported_reasons(sink) == {s["trace_id"]: None}


@pytest.mark.anyio
async def test_the_reason_is_the_exported_root_spans_when_the_tail_runs_here() -> None:
    # Head samples nothing new; a caller's sampled parent is followed; 5xx kept by the tail.
    app, sink = app_with({"ZER_VER_SAMPLER": "head:0,tail:error"})
    clock = app.clock
    assert isinstance(clock, VirtualClock)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with AppClient(app) as client:
        for target, headers in (("/r/a", []), ("/r/b", [("traceparent", parent)]), ("/r/boom", [])):
            await client.get(target, headers=headers)
            # Past tracez's sample interval (10 ms), so each request is kept as a sample.
            clock.advance(20_000_000)
        data = await samples_of(client)
        bucket = next(i for i, n in enumerate(data["row"]["latency"]) if n)
        listing = await client.get(f"/debug/tracez?name={quote(ROOT)}&kind=latency&bucket={bucket}")
        trace_api = {
            s["trace_id"]: orjson.loads(
                (await client.get(f"/debug/tracez/api/traces/{s['trace_id']}")).body
            )
            for s in data["samples"]
        }
    by_path = {s["path"]: s for s in data["samples"]}
    assert set(by_path) == {"/r/a", "/r/b", "/r/boom"}
    assert (by_path["/r/a"]["sampling_reason"], by_path["/r/a"]["sampling_decision"]) == (
        None,
        "dropped",
    )
    assert (by_path["/r/b"]["sampling_reason"], by_path["/r/b"]["sampling_decision"]) == (
        "head",
        "kept",
    )
    assert (by_path["/r/boom"]["sampling_reason"], by_path["/r/boom"]["sampling_decision"]) == (
        "tail:error",
        "kept",
    )
    assert by_path["/r/boom"]["sampled"] is True  # a tail keep exports it as sampled
    sampling = data["sampling"]
    assert sampling["sampler"] == {"head_ratio": 0.0, "parent_based": True, "tail": ["error"]}
    assert sampling["tail_decided_in"] == "this process"
    # The column is what the exported root span carries, and the waterfall's root too.
    exported = exported_reasons(sink)
    assert exported == {
        by_path["/r/b"]["trace_id"]: "head",
        by_path["/r/boom"]["trace_id"]: "tail:error",
    }
    for tid, trace in trace_api.items():
        assert trace["spans"][0]["attributes"].get("zerver.sampling.reason") == exported.get(tid)
    # The page shows the same, in words, with the note under the table.
    html = listing.body.decode()
    assert "<td>tail:error</td>" in html
    assert "zerver.sampling.reason" in html and "id=sampling-note" in html


def finished(flags: int, *, running: bool = False, reason: str | None = None) -> RequestRecord:
    clock = VirtualClock()
    rec = RequestRecord(clock, random.Random(1))
    rec.method, rec.route = "GET", "/r"
    rec.start_trace()
    rec.trace_flags = flags
    rec.sampling_reason = reason
    if not running:
        clock.advance(1000)
        rec.finish(200, 0)
    return rec


TAIL = SamplerSpec(head_ratio=0.1, tail=("error",))
HEAD_ONLY = SamplerSpec(head_ratio=0.1)


@pytest.mark.parametrize(
    ("spec", "here", "elsewhere", "rec", "expected"),
    [
        # No sampler: nothing to say beyond the sampled flag.
        (SamplerSpec(), True, False, finished(1), (None, "no_sampler")),
        # The tail ran here: its reason, or dropped.
        (TAIL, True, False, finished(1, reason="head"), ("head", "kept")),
        (TAIL, True, False, finished(1, reason="tail:error"), ("tail:error", "kept")),
        (TAIL, True, False, finished(0), (None, "dropped")),
        # The tail runs in the exporter process: the head's keep is known, not the tail's.
        (TAIL, False, True, finished(1), ("head", "kept")),
        (TAIL, False, True, finished(0), (None, "elsewhere")),
        # Head sampling alone is final wherever traces are built.
        (HEAD_ONLY, False, True, finished(0), (None, "dropped")),
        (HEAD_ONLY, False, True, finished(1), ("head", "kept")),
        # Export off: only the head decided.
        (TAIL, False, False, finished(0), (None, "dropped")),
        # Running: the head has decided, the tail has not yet.
        (TAIL, True, False, finished(1, running=True), ("head", "kept")),
        (TAIL, True, False, finished(0, running=True), (None, "pending")),
        (TAIL, False, True, finished(0, running=True), (None, "pending")),
        (HEAD_ONLY, True, False, finished(0, running=True), (None, "dropped")),
    ],
)
def test_what_this_process_knows_of_each_decision(
    spec: SamplerSpec,
    here: bool,
    elsewhere: bool,
    rec: RequestRecord,
    expected: tuple[str | None, str],
) -> None:
    got = _Sampling(spec, spec != SamplerSpec(), here, elsewhere).of(rec)
    assert (got["sampling_reason"], got["sampling_decision"]) == expected


def test_with_the_exporter_process_the_column_says_the_tail_is_decided_there(
    tmp_path: Path,
) -> None:
    env = operator_env(
        tmp_path / "modules",
        tmp_path / "state",
        ZER_VER_DB_PATH=str(tmp_path / "demo.sqlite3"),
        ZER_VER_EXPORT_PROCESS="on",
        ZER_VER_EXPORT_SPOOL_DIR=str(tmp_path / "spool"),
        OTEL_TRACES_EXPORTER="console",
        ZER_VER_SAMPLER="head:0,tail:error",
    )
    (tmp_path / "modules").mkdir()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    found: list[dict[str, Any]] = []
    html = ""
    with (
        zerver_process(["demo"], env, tmp_path) as (_proc, port, _lines),
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as c,
    ):
        # Two routes, two span names: the first request of each is always kept.
        assert c.get("/blogs/posts/1").status_code == 200
        assert c.get("/healthz", headers={"traceparent": parent}).status_code == 200
        for row in c.get("/debug/tracez/api/summary").json()["spans"]:
            if not row["name"].startswith("http.server: "):
                continue
            for bucket, count in enumerate(row["latency"]):
                if count:
                    params = {"name": row["name"], "kind": "latency", "bucket": str(bucket)}
                    data = c.get("/debug/tracez/api/samples", params=params).json()
                    found.extend(data["samples"])
                    assert data["sampling"]["tail_decided_in"] == "exporter process"
                    assert "not known here" in data["sampling"]["note"]
                    html += c.get("/debug/tracez", params=params).text
    by_path = {s["path"]: (s["sampling_reason"], s["sampling_decision"]) for s in found}
    assert by_path == {"/blogs/posts/1": (None, "elsewhere"), "/healthz": ("head", "kept")}
    assert "<td>not head-sampled; tail decided in the exporter process</td>" in html
    assert "<td>head</td>" in html
