"""Memory over a long run: RSS of the server, and of its exporter process, per request count.

What it measures: for each mode it starts ``python -m zerver run
loadtest.apps.zerver_app:create_app`` on 127.0.0.1 (an ephemeral port, SQLite in a
temporary directory, access log off) and, for the traced modes, an OTLP/HTTP
receiver in this process (:class:`zerver.export.OtlpReceiver`, bodies counted and
dropped). It then drives the server with wrk (or the Python load generator) in
chunks of ``--every`` requests over a few keep-alive connections, and after each
chunk waits until the receiver has been quiet for a moment (the export pipeline has
drained, so no backlog is counted as memory) and reads ``VmRSS`` from
``/proc/<pid>/status`` of the server and of its exporter child. Modes:

- ``off``: ``OTEL_TRACES_EXPORTER=none`` (no spans built);
- ``inprocess``: OTLP export, spans built and exported in the server process
  (``ZER_VER_EXPORT_PROCESS=off``);
- ``process``: OTLP export, records packed in the server and spans built and
  exported in the ``zerver-exporter`` child process (``ZER_VER_EXPORT_PROCESS=on``).

How to read it: one row per sample (requests served so far, RSS in MB of the server
and, in ``process`` mode, of the exporter child). The first rows include warm-up
(imports done lazily, caches and allocator arenas filling up); what matters is the
slope afterwards. The last lines give, per process, the growth in MB per 100 000
requests over the second half of the run (least-squares slope of the samples from
half the requests on) and the spans the receiver counted per request (a check that
tracing really ran and kept up). A leak shows as a steady positive slope; memory
that levels off shows as a slope near zero over the second half.

Run: ``python -m loadtest.bench_memory [--requests 500000] [--every 50000]
[--mode off|inprocess|process|all] [--path /items/42]``. Every run is bounded in
requests and in time (``--max-seconds`` per mode); every process started is stopped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zerver.export import OtlpReceiver

from ._loadgen import LoadResult, LoadSpec, available_tool, run_load

__all__ = ["MODES", "ModeResult", "Sample", "main", "run_mode"]

MODES = ("off", "inprocess", "process")
APP = "loadtest.apps.zerver_app:create_app"
_ROOT = Path(__file__).resolve().parent.parent
_MB = 1024.0  # /proc reports kB
_MARK = "BENCH_MEMORY "

# wrk keeps running until its -d duration even after a thread stops, so this
# script ends wrk itself at the request bound (the summary is not needed here).
# Responses still in flight then are not counted: at most one per connection.
_WRK_LUA = """
local limit, count, bad = 0, 0, 0
function init(args)
  limit = tonumber(args[1]) or 0
end
function response(status, headers, body)
  count = count + 1
  if status >= 300 then bad = bad + 1 end
  if limit > 0 and count >= limit then
    io.write(string.format("BENCH_MEMORY %d %d\\n", count, bad))
    io.flush()
    os.exit(0)
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_MEMORY %d %d\\n", count,
    bad + e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement, taken between two load chunks (the pipeline drained)."""

    requests: int
    """Responses received so far (all chunks)."""
    server_kb: int
    exporter_kb: int | None
    """The ``zerver-exporter`` child's RSS; ``None`` when there is no such process."""
    spans: int
    """Spans the receiver accepted so far."""
    elapsed_s: float


@dataclass(slots=True)
class ModeResult:
    mode: str
    path: str
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    """Non-2xx responses and socket errors of the load generator."""
    stopped_early: str = ""
    """Why the run ended before ``--requests`` (time bound, load generator failure)."""

    def growth_per_100k(self, which: str) -> float | None:
        """MB per 100 000 requests over the second half of the run (least squares)."""
        if not self.samples:
            return None
        half = self.samples[-1].requests / 2
        points = [
            (float(s.requests), float(kb) / _MB)
            for s in self.samples
            if s.requests >= half and (kb := _kb(s, which)) is not None
        ]
        slope = _slope(points)
        return None if slope is None else slope * 100_000

    def spans_per_request(self) -> float:
        last = self.samples[-1] if self.samples else None
        return last.spans / last.requests if last and last.requests else 0.0


def _kb(s: Sample, which: str) -> int | None:
    return s.server_kb if which == "server" else s.exporter_kb


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


# -- processes ----------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in kB; ``None`` if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(x) for x in f.read().split())
    return sorted(set(found))


def exporter_child(pid: int) -> int | None:
    """The server's ``zerver-exporter`` child: a ``multiprocessing`` spawn child
    (the resource tracker, also spawned, runs ``resource_tracker``)."""
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return child
    return None


class Server:
    """``python -m zerver run`` on 127.0.0.1:0 in a subprocess (or ``argv``, which must
    log zerver's JSON ``server started`` line); its stdout is read on a thread for the
    bound port and kept (last lines) for error messages."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        argv: Sequence[str] | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        if argv is None:
            argv = [sys.executable, "-m", "zerver", "run", APP]
            argv += ["--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(
            argv,
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: collections.deque[str] = collections.deque(maxlen=50)
        self._port: int | None = None
        self.exporter_pid: int | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()
        if not self._started.wait(start_timeout_s) or self._port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))
        self.port: int = self._port

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self._port is None and '"server started"' in line:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._port = int(json.loads(line)["port"])
                    self._started.set()
        self._started.set()  # exited before starting: wake the waiter

    def find_exporter(self, timeout_s: float = 10.0) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.exporter_pid is None and time.monotonic() < deadline:
            self.exporter_pid = exporter_child(self.proc.pid)
            if self.exporter_pid is None:
                time.sleep(0.1)
        return self.exporter_pid

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT (graceful: drains the exporter), then SIGKILL; the exporter child too."""
        child = self.exporter_pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if child is not None and rss_kb(child) is not None:
            # It exits on pipe EOF by itself; only a stuck one is left to kill.
            deadline = time.monotonic() + 5
            while rss_kb(child) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(OSError):
                if rss_kb(child) is not None:
                    os.kill(child, signal.SIGKILL)
        self._reader.join(5)


def server_env(mode: str, db_path: str, endpoint: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    env.update(
        ZER_VER_DB_PATH=db_path,
        ZER_VER_ACCESS_LOG="0",
        ZER_VER_LOG_FORMAT="json",
        ZER_VER_LOG_LEVEL="info",
    )
    if mode == "off":
        env["OTEL_TRACES_EXPORTER"] = "none"
    else:
        assert endpoint is not None
        env["OTEL_TRACES_EXPORTER"] = "otlp"
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        env["ZER_VER_EXPORT_PROCESS"] = "on" if mode == "process" else "off"
    for key in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        env.pop(key, None)
    return env


@contextlib.contextmanager
def _receiver(mode: str) -> Iterator[OtlpReceiver | None]:
    if mode == "off":
        yield None
        return
    receiver = OtlpReceiver(keep_bodies=False).start()
    try:
        yield receiver
    finally:
        receiver.stop()


def _wait_quiet(receiver: OtlpReceiver | None, quiet_s: float, timeout_s: float) -> None:
    """Until the receiver's span count has not moved for ``quiet_s`` (bounded)."""
    if receiver is None:
        time.sleep(quiet_s)
        return
    deadline = time.monotonic() + timeout_s
    last, since = receiver.span_count, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now_count = receiver.span_count
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def drive(spec: LoadSpec, tool: str) -> tuple[int, int]:
    """Send ``spec.max_requests`` requests (bounded by ``spec.duration_s``):
    ``(responses, errors)``."""
    if tool != "wrk":
        result: LoadResult = run_load(spec, tool)
        return result.requests, result.errors
    with tempfile.TemporaryDirectory(prefix="bench-memory-wrk-") as tmp:
        script = Path(tmp) / "bounded.lua"
        script.write_text(_WRK_LUA)
        argv = [
            "wrk",
            "-t1",
            f"-c{spec.connections}",
            f"-d{max(1, round(spec.duration_s))}s",
            f"--timeout={max(1, round(spec.timeout_s))}s",
            "-s",
            str(script),
            f"http://{spec.host}:{spec.port}{spec.path}",
            "--",
            str(spec.max_requests),
        ]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=spec.duration_s + spec.timeout_s + 10,
            check=False,
        )
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            responses, errors = line[len(_MARK) :].split()
            return int(responses), int(errors)
    raise RuntimeError(f"wrk exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")


# -- one mode -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    requests: int = 500_000
    every: int = 50_000
    path: str = "/items/42"
    connections: int = 4
    max_seconds: float = 900.0
    quiet_s: float = 1.0
    tool: str = "auto"


def run_mode(mode: str, cfg: RunConfig, *, progress: bool = True) -> ModeResult:
    """Start the server for ``mode``, drive ``cfg.requests`` in chunks, sample RSS."""
    result = ModeResult(mode=mode, path=cfg.path)
    tool = available_tool(cfg.tool)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, _receiver(mode) as receiver:
        endpoint = None if receiver is None else f"http://127.0.0.1:{receiver.port}"
        server = Server(server_env(mode, str(Path(tmp) / "db.sqlite3"), endpoint))
        try:
            exporter = server.find_exporter() if mode == "process" else None
            if mode == "process" and exporter is None:
                raise RuntimeError("no zerver-exporter child process found")
            t0 = time.monotonic()
            deadline = t0 + cfg.max_seconds
            done = 0

            def sample() -> None:
                kb = rss_kb(server.proc.pid)
                if kb is None:
                    raise RuntimeError("server exited:\n" + "\n".join(server.lines))
                s = Sample(
                    requests=done,
                    server_kb=kb,
                    exporter_kb=rss_kb(exporter) if exporter is not None else None,
                    spans=receiver.span_count if receiver is not None else 0,
                    elapsed_s=round(time.monotonic() - t0, 1),
                )
                result.samples.append(s)
                if progress:
                    print(f"  {mode:<9} {_row(s)}", file=sys.stderr, flush=True)

            sample()
            while done < cfg.requests:
                left = deadline - time.monotonic()
                if left < 5:
                    result.stopped_early = f"time bound ({cfg.max_seconds:g} s) reached"
                    break
                chunk = min(cfg.every, cfg.requests - done)
                spec = LoadSpec(
                    port=server.port,
                    path=cfg.path,
                    connections=cfg.connections,
                    duration_s=min(left, 600.0),
                    max_requests=chunk,
                )
                responses, errors = drive(spec, tool)
                done += responses
                result.errors += errors
                if responses == 0:
                    result.stopped_early = "the load generator got no responses"
                    break
                _wait_quiet(receiver, cfg.quiet_s, timeout_s=15.0)
                sample()
        finally:
            server.stop()
    return result


# -- report -------------------------------------------------------------------------


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / _MB:.1f}"


def _row(s: Sample) -> str:
    return (
        f"{s.requests:>9,} req  server {_mb(s.server_kb):>6} MB  "
        f"exporter {_mb(s.exporter_kb):>6} MB  spans {s.spans:,}  t={s.elapsed_s:g}s"
    )


def format_report(results: Sequence[ModeResult]) -> str:
    lines: list[str] = []
    for r in results:
        has_exporter = any(s.exporter_kb is not None for s in r.samples)
        lines.append(f"mode {r.mode}  (GET {r.path})")
        header = f"  {'requests':>9}  {'server MB':>9}"
        if has_exporter:
            header += f"  {'exporter MB':>11}"
        lines.append(header)
        for s in r.samples:
            row = f"  {s.requests:>9,}  {_mb(s.server_kb):>9}"
            if has_exporter:
                row += f"  {_mb(s.exporter_kb):>11}"
            lines.append(row)
        growth = [("server", r.growth_per_100k("server"))]
        if has_exporter:
            growth.append(("exporter", r.growth_per_100k("exporter")))
        half = r.samples[-1].requests // 2 if r.samples else 0
        text = ", ".join(f"{who} {'n/a' if g is None else f'{g:+.2f} MB'}" for who, g in growth)
        lines.append(f"  growth per 100k requests from {half:,} on: {text}")
        if r.mode != "off":
            lines.append(f"  spans received per request: {r.spans_per_request():.2f}")
        if r.errors:
            lines.append(f"  load errors (non-2xx + socket): {r.errors}")
        if r.stopped_early:
            lines.append(f"  stopped early: {r.stopped_early}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=500_000, help="per mode")
    parser.add_argument("--every", type=int, default=50_000, help="requests between samples")
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--path", default="/items/42")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="time bound per mode")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--json", type=Path, help="also write the samples here as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.every < 1 or args.connections < 1:
        parser.error("--requests, --every and --connections must be at least 1")
    cfg = RunConfig(
        requests=args.requests,
        every=args.every,
        path=args.path,
        connections=args.connections,
        max_seconds=args.max_seconds,
        tool=args.loadgen,
    )
    # SIGTERM ends the run like Ctrl-C: the servers started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    modes = MODES if args.mode == "all" else (args.mode,)
    results = [run_mode(mode, cfg) for mode in modes]
    print(format_report(results))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
