"""What a new user meets in the first minutes: where traces go, a collector that is not
there, what shutdown waits for, the ``traceresponse`` header, the console's trees.

Real ``zerver`` processes and sockets where the point is what an operator sees;
the formatters, the destination text and the pipeline's shutdown line directly.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from demo_process import operator_env, zerver_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import LogCapture
from support import served

from zerver import App, ConfigError, Context, Done, Response, step
from zerver._cli import (
    announce_traces,
    check_collector_soon,
    collector_problem,
    no_collector_message,
    trace_destination,
    tracez_text,
)
from zerver._config import load_settings
from zerver.export import ExportConfig, ExportPipeline, OtlpReceiver, build_exporter
from zerver.export._simple import (
    ConsoleTraceExporter,
    FanOutExporter,
    NoopExporter,
    console_format_from_env,
    describe_destination,
    format_trace,
    span_json,
)
from zerver.export._spans import InstrumentationScope, Resource, SpanData, SpanKind, StatusCode
from zerver.testing import AppClient, InMemorySpanSink, capture_logs

TRACERESPONSE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
WAIT_S = 20.0  # every wait on a process is bounded; none is expected to come close


# -- helpers ---------------------------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Output:
    """The rest of a process's stdout, read by a thread; waits are bounded."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def read() -> None:
            for raw in stream:
                self._q.put(raw.decode().rstrip("\n"))
            self._q.put(None)

        threading.Thread(target=read, daemon=True).start()

    def until(self, text: str) -> str:
        """Read lines until one contains ``text``; that line."""
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(self.lines))

    def rest(self) -> list[str]:
        """Every line up to the end of the output (the process has exited)."""
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                return self.lines
            self.lines.append(line)
        raise AssertionError("output did not end")


def events(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON log lines among ``lines`` (trees and span lines are not log lines)."""
    out = []
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(line)
            if isinstance(doc, dict) and "event" in doc:
                out.append(doc)
    return out


def get(port: int, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "plain.py").write_text(
        textwrap.dedent(
            """
            from zerver import App

            app = App("plain")
            """
        )
    )
    return tmp_path


def env_for(cwd: Path, **extra: str) -> dict[str, str]:
    return operator_env(
        cwd / "modules", cwd / "state", ZER_VER_DB_PATH=str(cwd / "demo.sqlite3"), **extra
    )


def stop(proc: subprocess.Popen[bytes]) -> float:
    """SIGTERM, wait for the exit; the seconds it took."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S + 10) == 0
    return time.monotonic() - started


# -- 1. where traces go, said once at start ----------------------------------------------


def test_demo_says_traces_go_nowhere_when_export_is_off(cwd: Path) -> None:
    with zerver_process(["demo"], env_for(cwd), cwd) as (proc, _port, lines):
        stop(proc)
    said = [e["event"].split("; ")[0] for e in lines if e["event"].startswith("traces go")]
    assert said == ["traces go nowhere (OTEL_TRACES_EXPORTER=none)"]


def test_the_start_line_names_the_tracez_address_where_the_pages_answer(cwd: Path) -> None:
    with zerver_process(["demo"], env_for(cwd), cwd) as (proc, port, lines):
        (line,) = [e["event"] for e in lines if e["event"].startswith("traces go")]
        # With --port 0 the address is the one the "server started" line gives.
        assert line.endswith("; tracez at /debug/tracez on this server"), line
        assert get(port, "/debug/tracez").status == 200
        stop(proc)
    quiet = (
        (["demo"], env_for(cwd, ZER_VER_ZPAGES="off")),
        (["run", "plain:app"], env_for(cwd)),
    )
    for args, env in quiet:
        with zerver_process(args, env, cwd) as (proc, port, lines):
            (line,) = [e["event"] for e in lines if e["event"].startswith("traces go")]
            assert "tracez" not in line, line
            assert get(port, "/debug/tracez").status == 404
            stop(proc)


def test_run_says_where_otlp_traces_go_and_warns_once_that_no_collector_answers(
    cwd: Path,
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}/v1/traces"
    env = env_for(
        cwd,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint,
        # No export is attempted while the server runs: the warning can only come from
        # the start-up check, not from a failed export.
        OTEL_BSP_SCHEDULE_DELAY="600000",
        ZER_VER_EXPORT_PROCESS="off",
    )
    with zerver_process(["run", "plain:app"], env, cwd) as (proc, port, lines):
        said = [e["event"] for e in lines if e["event"].startswith("traces go")]
        assert said == [f"traces go to OTLP http/json at {endpoint} (built in this process)"]
        out = Output(proc)
        warning = next(
            (e for e in lines if "no trace collector" in e["event"]), None
        ) or orjson.loads(out.until("no trace collector"))
        assert warning["level"] == "warning" and warning["endpoint"] == endpoint
        text = warning["event"]
        assert f"no trace collector answers at {endpoint}" in text
        assert "start a collector or Jaeger there" in text
        assert "OTEL_TRACES_EXPORTER=console" in text and "Serving goes on" in text
        # It keeps serving, and says it once.
        assert get(port, "/missing").status == 404
        assert get(port, "/missing").status == 404
        stop(proc)
        rest = events(out.rest())
    everything = [*lines, *rest]
    assert sum("no trace collector" in e["event"] for e in everything) == 1


def test_console_export_is_announced_with_its_format(cwd: Path) -> None:
    env = env_for(cwd, OTEL_TRACES_EXPORTER="console", ZER_VER_CONSOLE_FORMAT="jsonl")
    with zerver_process(["demo"], env, cwd) as (proc, _port, lines):
        stop(proc)
    said = [e["event"].split("; ")[0] for e in lines if e["event"].startswith("traces go")]
    assert said == ["traces go to standard output as JSON lines (console)"]
    assert not any("no trace collector" in e["event"] for e in lines)


def test_trace_destination_in_words() -> None:
    off = load_settings({"ZER_VER_EXPORT_PROCESS": "off"})
    on = load_settings({"ZER_VER_EXPORT_PROCESS": "on"})
    both = ExportConfig.from_env(
        {
            "OTEL_TRACES_EXPORTER": "otlp,console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    )
    assert trace_destination(off, both) == (
        "traces go to OTLP http/protobuf at http://collector:4318/v1/traces "
        "(built in this process) and standard output as trees (console)"
    )
    assert "(built in an exporter process)" in trace_destination(on, ExportConfig())
    none = ExportConfig.from_env({"OTEL_TRACES_EXPORTER": "none"})
    assert trace_destination(off, none) == "traces go nowhere (OTEL_TRACES_EXPORTER=none)"


def test_the_line_takes_extra_phrases() -> None:
    settings = load_settings({"ZER_VER_EXPORT_PROCESS": "off"})
    with capture_logs() as logs:
        line = announce_traces(settings, ExportConfig(), ["tracez at http://h:1/debug/tracez"])
    assert line.endswith("(built in this process); tracez at http://h:1/debug/tracez")
    assert [e["event"] for e in logs] == [line]
    assert logs[0]["log_level"] == "info" and logs[0]["exporters"] == "otlp"


def test_tracez_address_when_the_pages_are_on() -> None:
    assert tracez_text(load_settings({})) is None
    on = {"ZER_VER_ZPAGES": "on", "ZER_VER_PORT": "9000"}
    assert tracez_text(load_settings(on)) == "tracez at http://127.0.0.1:9000/debug/tracez"
    wide = load_settings({**on, "ZER_VER_HOST": "0.0.0.0", "ZER_VER_ZPAGES_PATH": "/ops"})
    assert tracez_text(wide) == "tracez at http://127.0.0.1:9000/ops/tracez"
    assert tracez_text(load_settings({**on, "ZER_VER_HOST": "::1"})) == (
        "tracez at http://[::1]:9000/debug/tracez"
    )
    assert tracez_text(load_settings({**on, "ZER_VER_PORT": "0"})) == (
        "tracez at /debug/tracez on this server"
    )
    assert tracez_text(load_settings({**on, "ZER_VER_HOST": "localhost"})) == (
        "tracez at http://localhost:9000/debug/tracez"
    )


def test_tracez_address_says_when_the_bound_address_is_refused() -> None:
    """A browser on this machine that opens a non-loopback bound address connects
    from that address, which the pages refuse unless the allow-list admits it."""
    on = {"ZER_VER_ZPAGES": "on", "ZER_VER_PORT": "9000", "ZER_VER_HOST": "10.1.2.3"}
    line = tracez_text(load_settings(on))
    assert line == (
        "tracez at http://10.1.2.3:9000/debug/tracez, served to loopback clients only, "
        "so a browser reaching 10.1.2.3 is refused (404); to admit it, set "
        "ZER_VER_ZPAGES_ALLOW=10.1.2.3/32 or the clients' network"
    )
    six = tracez_text(load_settings({**on, "ZER_VER_HOST": "fd00::5"}))
    assert six is not None and "http://[fd00::5]:9000/" in six
    assert "ZER_VER_ZPAGES_ALLOW=fd00::5/128" in six
    # Another 127.0.0.0/8 address is not loopback to the pages either.
    assert "refused" in (tracez_text(load_settings({**on, "ZER_VER_HOST": "127.0.0.2"})) or "")
    admitted = load_settings({**on, "ZER_VER_ZPAGES_ALLOW": "10.1.0.0/16"})
    assert tracez_text(admitted) == "tracez at http://10.1.2.3:9000/debug/tracez"


# -- 2. no collector: said once, early, with the two fixes -------------------------------


def test_collector_check_tells_a_listener_from_a_closed_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert collector_problem(f"http://127.0.0.1:{port}/v1/traces") is None
    assert collector_problem(f"http://127.0.0.1:{closed_port()}/v1/traces") is not None
    assert collector_problem("http://127.0.0.1:99999/v1/traces") == "its port is not a number"
    too_long = "http://" + "a" * 70 + ".example:4318/v1/traces"  # refused before any lookup
    assert (collector_problem(too_long) or "").startswith("UnicodeError")


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_collector_check_warns_once_only_for_otlp(env: dict[str, str], warned: bool) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    config = ExportConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **env})
    with capture_logs() as logs:
        thread = check_collector_soon(config, {})
        if thread is not None:
            thread.join(WAIT_S)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == (1 if warned else 0)
    assert (thread is not None) == warned


def test_collector_check_is_quiet_when_something_listens() -> None:
    with OtlpReceiver() as receiver, capture_logs() as logs:
        config = ExportConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        thread = check_collector_soon(config, {})
        assert thread is not None
        thread.join(WAIT_S)
    assert logs == []


def test_no_collector_message_names_both_fixes_and_the_fate_of_traces() -> None:
    spooled = no_collector_message("http://localhost:4318/v1/traces", "refused", spooling=True)
    assert spooled.startswith("no trace collector answers at http://localhost:4318/v1/traces")
    assert "wait in the spool" in spooled
    assert "docker run --rm -p 4318:4318 -p 16686:16686 jaegertracing/all-in-one" in spooled
    assert "OTEL_TRACES_EXPORTER=console" in spooled and "(none: no export)" in spooled
    dropped = no_collector_message("http://127.0.0.1:9999/v1/traces", "refused", spooling=False)
    assert "dropped after retries" in dropped and "-p 9999:4318" in dropped
    assert "\n" not in spooled + dropped


# -- 3. shutdown says what it waits for ----------------------------------------------------


class Collector:
    """A stand-in OTLP exporter that says where it sends; ``export`` waits for ``go``
    (bounded) when one is given."""

    endpoint = "http://collector:4318/v1/traces"

    def __init__(self, go: threading.Event | None = None) -> None:
        self.sink = InMemorySpanSink()
        self.go = go

    def export(self, spans: Any, ctx: Any) -> Any:
        if self.go is not None:
            assert self.go.wait(WAIT_S)
        return self.sink.export(spans, ctx)

    def shutdown(self) -> None:
        return None


class Announced(LogCapture):
    """Captures log lines; sets ``seen`` once the shutdown line is logged."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        if str(event.get("event", "")).startswith("flushing"):
            self.seen.set()
        return super().__call__(logger, method, event)


@contextlib.contextmanager
def announced() -> Iterator[Announced]:
    capture = Announced()
    old = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, capture],
        cache_logger_on_first_use=False,
    )
    try:
        yield capture
    finally:
        structlog.configure(**old)


def span(i: int, **kw: Any) -> SpanData:
    fields: dict[str, Any] = {
        "name": f"work {i}",
        "trace_id": 0xABC,
        "span_id": i,
        "kind": SpanKind.INTERNAL,
        "start_ns": 1_000_000 * i,
        "end_ns": 1_000_000 * i + 250_000,
        "resource": Resource(attributes={"service.name": "first-minutes"}),
        "scope": InstrumentationScope(name="zerver"),
    }
    fields.update(kw)
    return SpanData(**fields)


def test_a_slow_shutdown_says_how_many_spans_it_flushes_where_and_for_how_long() -> None:
    with announced() as capture:
        # The batch is sent only once the line is out: the flush is "slow" for sure.
        collector = Collector(go=capture.seen)
        pipeline = ExportPipeline(collector, schedule_delay_s=3600, announce_after_s=0.0)
        for i in range(3):
            pipeline.submit(span(i + 1))
        assert pipeline.shutdown(2.0).completed
    flushing = [e for e in capture.entries if e["event"].startswith("flushing")]
    assert len(flushing) == 1
    assert re.fullmatch(
        r"flushing 3 spans to http://collector:4318/v1/traces, up to (2|1\.\d+)s",
        flushing[0]["event"],
    )
    assert flushing[0]["spans"] == 3 and 0 < flushing[0]["timeout_s"] <= 2.0
    assert flushing[0]["log_level"] == "info"
    assert len(collector.sink.spans) == 3


def test_a_flush_done_within_the_grace_says_nothing() -> None:
    collector = Collector()
    pipeline = ExportPipeline(collector, schedule_delay_s=3600, announce_after_s=WAIT_S)
    for i in range(3):
        pipeline.submit(span(i + 1))
    with capture_logs() as logs:
        assert pipeline.shutdown(WAIT_S).completed
    assert not any(e["event"].startswith("flushing") for e in logs)
    assert len(collector.sink.spans) == 3


def test_shutdown_with_nothing_to_flush_says_nothing_of_flushing() -> None:
    pipeline = ExportPipeline(Collector(), schedule_delay_s=3600, announce_after_s=0.0)
    with capture_logs() as logs:
        pipeline.shutdown(2.0)
    assert not any(e["event"].startswith("flushing") for e in logs)


def test_destinations_in_words() -> None:
    otlp = build_exporter(ExportConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:1"}))
    assert describe_destination(otlp) == "http://c:1/v1/traces"
    assert describe_destination(ConsoleTraceExporter()) == "standard output"
    assert describe_destination(NoopExporter()) == "nowhere"
    fan = FanOutExporter(otlp, ConsoleTraceExporter())
    assert describe_destination(fan) == "http://c:1/v1/traces and standard output"
    assert describe_destination(InMemorySpanSink()) == "InMemorySpanSink"


@pytest.mark.parametrize("process", ["off", "on"])
def test_shutdown_with_no_collector_says_so_and_keeps_to_its_bound(cwd: Path, process: str) -> None:
    """Measured on a 2-core machine, SIGTERM to exit: 2.0 s with this 2 s bound (retries
    until the deadline, spool off); 6.5-7.0 s with the default 10 s; with the spool on
    (the default) 0.1-0.2 s."""
    endpoint = f"http://127.0.0.1:{closed_port()}/v1/traces"
    bound = 2.0
    env = env_for(
        cwd,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="600000",  # everything waits for shutdown
        ZER_VER_EXPORT_PROCESS=process,
        ZER_VER_EXPORT_SPOOL_DIR="off",
        ZER_VER_SHUTDOWN_TIMEOUT_S=str(bound),
    )
    with zerver_process(["demo"], env, cwd) as (proc, port, _lines):
        out = Output(proc)
        for _ in range(2):
            assert get(port, "/blogs/posts/1").status == 200
        took = stop(proc)
        lines = events(out.rest())
    flushing = [e for e in lines if e["event"].startswith("flushing")]
    assert len(flushing) == 1, lines
    assert re.fullmatch(
        rf"flushing \d+ spans to {re.escape(endpoint)}, up to [\d.]+s", flushing[0]["event"]
    )
    assert flushing[0]["spans"] > 0 and flushing[0]["timeout_s"] <= bound
    # A bound, not a benchmark: "not several seconds more than the configured bound".
    assert took < bound + 5.0


# -- 4. the traceresponse header ------------------------------------------------------------


@step
def hello(ctx: Context) -> Done:
    return Done(Response.text("hi"))


def traced_app(**env: str) -> tuple[App, InMemorySpanSink]:
    app = App("first-minutes", settings=load_settings(env))
    app.get("/hello", hello)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    return app, sink


def header(response: Response, name: str) -> list[str]:
    return [v for k, v in response.headers if k.lower() == name]


def server_span(spans: list[SpanData]) -> SpanData:
    (root,) = [s for s in spans if s.kind == SpanKind.SERVER]
    return root


@pytest.mark.anyio
async def test_traceresponse_names_the_exported_server_span() -> None:
    app, sink = traced_app()
    async with AppClient(app) as client:
        ok = await client.get("/hello")
        missing = await client.get("/nowhere")
    for response, spans in zip((ok, missing), sink.traces, strict=True):
        (value,) = header(response, "traceresponse")
        m = TRACERESPONSE.match(value)
        assert m is not None, value
        root = server_span(spans)
        assert m.groups() == (f"{root.trace_id:032x}", f"{root.span_id:016x}", "01")


@pytest.mark.anyio
async def test_traceresponse_on_the_wire() -> None:
    app, sink = traced_app()
    async with served(app) as base:
        port = int(base.rsplit(":", 1)[1])
        import anyio.to_thread

        response = await anyio.to_thread.run_sync(get, port, "/hello")
    value = response.getheader("traceresponse")
    assert value is not None and response.status == 200
    root = server_span(sink.spans)
    assert value == f"00-{root.trace_id:032x}-{root.span_id:016x}-01"


@pytest.mark.anyio
@pytest.mark.parametrize("switch", ["off", "OFF", "0", "false"])
async def test_traceresponse_can_be_switched_off(switch: str) -> None:
    app, _sink = traced_app(ZER_VER_TRACE_RESPONSE_HEADER=switch)
    async with AppClient(app) as client:
        response = await client.get("/hello")
    assert header(response, "traceresponse") == []
    assert header(response, "x-request-id")  # the rest is as before


@pytest.mark.parametrize("value", ["yes", "2", "enabled", "o n"])
def test_a_bad_traceresponse_switch_stops_start_up_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="ZER_VER_TRACE_RESPONSE_HEADER") as err:
        load_settings({"ZER_VER_TRACE_RESPONSE_HEADER": value})
    assert "on, off" in str(err.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trace_id=st.integers(min_value=1, max_value=2**128 - 1),
    parent_id=st.integers(min_value=1, max_value=2**64 - 1),
    sampled=st.booleans(),
)
def test_traceresponse_continues_the_callers_trace(
    trace_id: int, parent_id: int, sampled: bool
) -> None:
    import anyio

    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-{'01' if sampled else '00'}"

    async def ask() -> str:
        app, _sink = traced_app()
        async with AppClient(app) as client:
            response = await client.get("/hello", headers=[("traceparent", traceparent)])
        (value,) = header(response, "traceresponse")
        return value

    value = anyio.run(ask)
    m = TRACERESPONSE.match(value)
    assert m is not None
    got_trace, got_span, flags = m.groups()
    assert got_trace == f"{trace_id:032x}"
    assert got_span not in (f"{parent_id:016x}", "0" * 16)
    assert int(flags, 16) & 0x01 == int(sampled)


# -- 5. the console: one trace at a time, as a tree; JSON lines for programs ---------------


def sample_trace(trace_id: int = 0xABC) -> list[SpanData]:
    """A server span, a step under it with an effect, a failed effect; given out of order."""
    t = trace_id
    root = span(
        1,
        trace_id=t,
        name="http.server: GET /blogs/posts/{id}",
        kind=SpanKind.SERVER,
        start_ns=0,
        end_ns=3_000_000,
        attributes={
            "http.response.status_code": 200,
            "http.status_code": 200,
            "url.path": "/blogs/posts/1",
            "http.target": "/blogs/posts/1",
        },
    )
    first = span(
        2,
        trace_id=t,
        parent_span_id=1,
        name="step.route_match",
        start_ns=0,
        end_ns=10_000,
        attributes={"zerver.step.decision": "Continue"},
    )
    load = span(
        3,
        trace_id=t,
        parent_span_id=1,
        name="step.load",
        start_ns=20_000,
        end_ns=2_000_000,
        attributes={"zerver.step.decision": "Need"},
    )
    db = span(
        4,
        trace_id=t,
        parent_span_id=3,
        name="db.get blog_post",
        kind=SpanKind.CLIENT,
        start_ns=30_000,
        end_ns=1_500_000,
        status_code=StatusCode.ERROR,
        status_message="timeout",
        attributes={"db.key": "1", "job.queue_wait_ms": 0.25, "job.attempt": 2},
    )
    cache = span(
        5,
        trace_id=t,
        parent_span_id=3,
        name="cache.get author",
        kind=SpanKind.CLIENT,
        start_ns=25_000,
        end_ns=40_000,
        status_code=StatusCode.OK,
        attributes={"cache.hit": True, "job.queue_wait_ms": 0.0, "job.attempt": 1},
    )
    return [db, cache, load, first, root]


def test_a_trace_is_an_indented_tree_with_the_attributes_that_matter() -> None:
    assert format_trace(sample_trace()) == "\n".join(
        [
            "trace 00000000000000000000000000000abc (5 spans)",
            "  http.server: GET /blogs/posts/{id}  3.000 ms  SERVER"
            "  http.response.status_code=200 url.path=/blogs/posts/1",
            "    step.route_match  0.010 ms  INTERNAL  zerver.step.decision=Continue",
            "    step.load  1.980 ms  INTERNAL  zerver.step.decision=Need",
            "      cache.get author  0.015 ms  CLIENT  cache.hit=True",
            "      db.get blog_post  1.470 ms  CLIENT  ERROR: timeout"
            "  db.key=1 job.queue_wait_ms=0.250 job.attempt=2",
        ]
    )


def test_a_span_whose_parent_is_elsewhere_is_shown_at_the_top() -> None:
    lone = span(9, parent_span_id=77, name="late child")
    assert format_trace([lone]).splitlines()[1] == "  late child  0.250 ms  INTERNAL"


def test_console_writes_one_trace_at_a_time() -> None:
    a, b = sample_trace(0xA), sample_trace(0xB)
    mixed = [s for pair in zip(a, b, strict=True) for s in pair]  # interleaved by the batch
    out = io.StringIO()
    result = ConsoleTraceExporter(out).export(mixed)
    assert result.ok and result.bytes_sent == len(out.getvalue())
    text = out.getvalue()
    assert text == format_trace(a) + "\n\n" + format_trace(b) + "\n\n"


def test_console_json_lines_are_one_span_each_for_programs() -> None:
    out = io.StringIO()
    spans = sample_trace()
    ConsoleTraceExporter(out, format="jsonl").export(spans)
    docs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [d["span_id"] for d in docs] == [f"{s.span_id:016x}" for s in spans]
    db = docs[0]
    assert db["trace_id"] == "00000000000000000000000000000abc"
    assert db["parent_span_id"] == "0000000000000003" and docs[-1]["parent_span_id"] is None
    assert db["kind"] == "CLIENT" and db["status"] == {"code": "ERROR", "message": "timeout"}
    assert db["attributes"]["db.key"] == "1" and db["duration_ms"] == 1.47
    assert span_json(spans[0]) == out.getvalue().splitlines()[0].encode()


def test_console_write_failure_is_reported_not_raised() -> None:
    stream = io.StringIO()
    stream.close()
    result = ConsoleTraceExporter(stream).export(sample_trace())
    assert not result.ok and "console write failed" in result.detail
    assert ConsoleTraceExporter(stream).export([]).ok


@pytest.mark.parametrize(
    ("raw", "expected"), [("", "tree"), ("tree", "tree"), ("JSONL", "jsonl"), (" jsonl ", "jsonl")]
)
def test_console_format_is_read_from_the_environment(raw: str, expected: str) -> None:
    assert console_format_from_env({"ZER_VER_CONSOLE_FORMAT": raw}) == expected
    assert load_settings({"ZER_VER_CONSOLE_FORMAT": raw}).console_format == expected
    config = ExportConfig.from_env({"OTEL_TRACES_EXPORTER": "console"})
    exporter = build_exporter(config, console_format=console_format_from_env({}))
    assert isinstance(exporter, ConsoleTraceExporter) and exporter.format == "tree"


@pytest.mark.parametrize("raw", ["json", "lines", "xml", "tree,jsonl"])
def test_a_bad_console_format_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="ZER_VER_CONSOLE_FORMAT") as err:
        console_format_from_env({"ZER_VER_CONSOLE_FORMAT": raw})
    assert "tree, jsonl" in str(err.value)
    with pytest.raises(ConfigError, match="ZER_VER_CONSOLE_FORMAT"):
        load_settings({"ZER_VER_CONSOLE_FORMAT": raw})
    with pytest.raises(ValueError, match="format"):
        ConsoleTraceExporter(format=raw)  # type: ignore[arg-type]


@pytest.mark.parametrize("process", ["off", "on"])
def test_console_run_prints_trees_of_the_requests_made(cwd: Path, process: str) -> None:
    env = env_for(
        cwd,
        OTEL_TRACES_EXPORTER="console",
        OTEL_BSP_SCHEDULE_DELAY="600000",  # printed at shutdown, after the requests
        ZER_VER_EXPORT_PROCESS=process,
    )
    with zerver_process(["demo"], env, cwd) as (proc, port, _lines):
        out = Output(proc)
        responses = [get(port, "/blogs/posts/1") for _ in range(2)]
        stop(proc)
        lines = out.rest()
    trace_ids = [TRACERESPONSE.match(r.getheader("traceresponse") or "") for r in responses]
    for m in trace_ids:
        assert m is not None
        head = f"trace {m.group(1)} ("
        at = next(i for i, line in enumerate(lines) if line.startswith(head))
        tree = lines[at + 1 : lines.index("", at)]
        assert tree[0].startswith("  http.server: GET /blogs/posts/{id}  ")
        assert "http.response.status_code=200" in tree[0]
        assert tree[1].startswith("    step.route_match  ")
        assert any(line.startswith("      db.get blog_post  ") for line in tree)


def test_console_run_in_json_lines(cwd: Path) -> None:
    env = env_for(
        cwd,
        OTEL_TRACES_EXPORTER="console",
        ZER_VER_CONSOLE_FORMAT="jsonl",
        OTEL_BSP_SCHEDULE_DELAY="600000",
        ZER_VER_EXPORT_PROCESS="off",
    )
    with zerver_process(["demo"], env, cwd) as (proc, port, _lines):
        out = Output(proc)
        response = get(port, "/blogs/posts/1")
        stop(proc)
        lines = out.rest()
    m = TRACERESPONSE.match(response.getheader("traceresponse") or "")
    assert m is not None
    spans = [d for d in map(orjson.loads, filter(None, lines)) if "event" not in d]
    mine = [d for d in spans if d["trace_id"] == m.group(1)]
    assert {d["name"] for d in mine} >= {"http.server: GET /blogs/posts/{id}", "db.get blog_post"}
    (root,) = [d for d in mine if d["kind"] == "SERVER"]
    assert root["span_id"] == m.group(2)


def test_a_bad_console_format_stops_start_up(cwd: Path) -> None:
    env = env_for(cwd, OTEL_TRACES_EXPORTER="console", ZER_VER_CONSOLE_FORMAT="pretty")
    done = subprocess.run(
        [sys.executable, "-m", "zerver", "demo", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("zerver: ZER_VER_CONSOLE_FORMAT='pretty' is invalid")
