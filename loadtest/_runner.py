"""Runs the contenders one after another and reports.

Per contender: start a span receiver, start the server on a free 127.0.0.1
port (pinned to CPU 0), poll the port until it accepts (bounded), then per
workload a warm-up and a measured load (load generator pinned to CPU 1, this
process and its receiver too), stop the server (SIGTERM, SIGKILL after a
deadline), wait until the receiver is quiet and count.

A contender on shared backends (``Contender.backends``) gets a PostgreSQL and
a Redis server of its own, started before it on free ports (the way zerver's
test suite starts them, :mod:`zerver.testing._servers`) and removed after it.
They run beside the load generator (its CPU when pinned), so the server under
test keeps its CPU to itself, as every other contender does.

Span loss is judged on root SERVER spans: every request zerver serves makes
one trace whose root is a SERVER span, so after the server has drained its
exporter and exited, ``root SERVER spans received >= responses the load
generator completed`` (warm-ups included) must hold. Requests in flight when a
load generator stopped may add roots beyond that; they are never a loss.
Timings never fail a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from ._contenders import Contender, Workload
from ._loadgen import LoadResult, LoadSpec, available_tool, run_load
from ._receiver import MetricsReceiver, SpanReceiver, TallySnapshot

__all__ = [
    "ContenderResult",
    "Report",
    "RunConfig",
    "WorkloadResult",
    "format_table",
    "median_ratios",
    "ratio_lines",
    "ratios",
    "round_ratios",
    "run_all",
    "start_backends",
    "start_server",
    "write_results",
    "write_svg",
]

_ROOT = Path(__file__).resolve().parent.parent
_SERVER_CPU = 0
_LOAD_CPU = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    duration_s: float = 10.0
    warmup_s: float = 2.0
    connections: int = 64
    max_requests: int = 1_000_000
    """Per measured load (warm-ups get a tenth)."""
    loadgen: str = "auto"
    pin: bool = True
    out: Path = _ROOT / "loadtest" / "results"
    rounds: int = 1
    """Times every contender runs, in turn (round 1 of each, then round 2, ...)."""
    ready_timeout_s: float = 20.0
    stop_timeout_s: float = 15.0
    quick: bool = False


@dataclass(slots=True, kw_only=True)
class WorkloadResult:
    contender: str
    workload: str
    path: str
    route: str = ""
    """The route template (``/items/{id}``); ratios are labelled with it (else with ``path``)."""
    load: LoadResult | None = None
    warmup_requests: int = 0
    spans: int = 0
    root_spans: int = 0
    server_cpu_s: float | None = None
    """CPU seconds the server process used during the measured load (all its threads)."""
    children_cpu_s: float | None = None
    """CPU seconds the server's child processes (zerver's exporter process) used meanwhile."""
    error: str = ""

    @property
    def requests_total(self) -> int:
        return self.warmup_requests + (self.load.requests if self.load else 0)

    def cpu_us_per_request(self) -> tuple[float, float] | None:
        """(server, children) CPU µs per measured request, when measured."""
        if self.server_cpu_s is None or self.load is None or not self.load.requests:
            return None
        n = self.load.requests
        return self.server_cpu_s * 1e6 / n, (self.children_cpu_s or 0.0) * 1e6 / n

    def to_dict(self) -> dict[str, object]:
        return {
            "contender": self.contender,
            "workload": self.workload,
            "path": self.path,
            "route": self.route,
            "load": self.load.to_dict() if self.load else None,
            "warmup_requests": self.warmup_requests,
            "requests_total": self.requests_total,
            "spans": self.spans,
            "root_spans": self.root_spans,
            "server_cpu_s": self.server_cpu_s,
            "children_cpu_s": self.children_cpu_s,
            "error": self.error,
        }


@dataclass(slots=True, kw_only=True)
class ContenderResult:
    name: str
    title: str
    traced: bool
    check_spans: bool
    round: int = 1
    """Which round of the run this is (``--rounds``)."""
    workloads: list[WorkloadResult] = field(default_factory=list)
    spans: int = 0
    root_server_spans: int = 0
    unattributed_spans: int = 0
    export_requests: int = 0
    decode_errors: int = 0
    rejected_requests: int = 0
    metrics_exports: int = 0
    """Metrics export requests received (contenders exporting metrics)."""
    metrics_requests: int = 0
    """Requests the server's duration histogram counted, in its largest export."""
    exit_code: int | None = None
    killed: bool = False
    log: str = ""
    log_problems: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def requests_total(self) -> int:
        return sum(w.requests_total for w in self.workloads)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["workloads"] = [w.to_dict() for w in self.workloads]
        d["requests_total"] = self.requests_total
        d["ok"] = self.ok
        return d


# -- processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_cpu(pid: int) -> tuple[float, float] | None:
    """(CPU seconds of ``pid`` itself, CPU seconds of its live child processes), from /proc.

    Child processes are those whose parent is ``pid`` (zerver's exporter process);
    None where /proc cannot be read. Grandchildren are not counted.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def stat(path: Path) -> list[str] | None:
        try:
            text = path.read_text()
        except OSError:
            return None
        # the command name is in parentheses and may hold spaces
        return text[text.rindex(")") + 2 :].split()

    own = stat(Path(f"/proc/{pid}/stat"))
    if own is None:
        return None
    children = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(pid):
            continue
        fields = stat(entry / "stat")
        if fields is not None and fields[1] == str(pid):
            children += (int(fields[11]) + int(fields[12])) / tick
    return (int(own[11]) + int(own[12])) / tick, children


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll until ``port`` accepts a connection; RuntimeError if the process exits or time's up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                time.sleep(0.05)
                continue
            return
    raise RuntimeError(f"server did not listen on port {port} within {timeout_s:g} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``; True when it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return True


def _taskset(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


@contextlib.contextmanager
def start_backends(contender: Contender) -> Iterator[dict[str, str]]:
    """The servers ``contender.backends`` names, started for it alone and removed
    afterwards; yields the values of its placeholders (``db_url``, ``cache_url``).
    RuntimeError when one cannot be started (its binaries missing, say)."""
    from zerver.testing._servers import postgres_server, redis_server

    unknown = sorted(set(contender.backends) - {"postgresql", "redis"})
    if unknown:
        raise RuntimeError(f"unknown backend {unknown[0]!r}: accepted: postgresql, redis")
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if "postgresql" in contender.backends:
            pg = stack.enter_context(postgres_server())
            urls["db_url"] = pg.url(pg.database)
        if "redis" in contender.backends:
            urls["cache_url"] = stack.enter_context(redis_server()).url
        yield urls


def start_server(
    contender: Contender,
    port: int,
    receiver: str,
    data_dir: str,
    log: IO[bytes],
    prefix: Sequence[str] = (),
    metrics: str = "",
    backends: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``contender`` on 127.0.0.1:``port`` in its clean environment (its data
    under ``data_dir``, its spans to ``receiver``, its ``backends`` URLs from
    :func:`start_backends`), output to ``log``; ``prefix`` goes before its command
    (``taskset``, ``valgrind``)."""
    return subprocess.Popen(
        [*prefix, *contender.argv, "--host", "127.0.0.1", "--port", str(port)],
        cwd=_ROOT,
        env=_server_env(contender, receiver, data_dir, metrics, backends or {}),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the server
    )


def _server_env(
    contender: Contender,
    receiver: str,
    db_dir: str,
    metrics: str = "",
    backends: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ZER_VER_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    if "ZER_VER_DB_URL" not in contender.env:  # zerver refuses a URL and a path at once
        env["ZER_VER_DB_PATH"] = str(Path(db_dir) / "loadtest.sqlite3")
    # A spool of the run's own: nothing left by an earlier run is replayed into this one.
    env["ZER_VER_EXPORT_SPOOL_DIR"] = str(Path(db_dir) / "spool")
    values = {"receiver": receiver, "metrics": metrics, **(backends or {})}
    for key, template in contender.env.items():
        value = template
        for name, replacement in values.items():
            value = value.replace("{" + name + "}", replacement)
        env[key] = value
    return env


_PROBLEM_WORDS = ("traceback", "error", "exception", "critical", "dropped", "lost")
_PROBLEM_LEVELS = frozenset({"warning", "error", "critical", "exception"})


def _is_problem(line: str) -> bool:
    """Whether a server log line reports a problem.

    A JSON line (zerver's structured log) is one when its level is warning or worse,
    or when it counts something lost or dropped that is not zero (``"lost": 0`` in
    a consumer's or the exporter's closing counters is the good news); any other
    line when it has a word such as ``error`` or ``traceback``.
    """
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return any(w in line.lower() for w in _PROBLEM_WORDS)
    if str(event.get("level", "")).lower() in _PROBLEM_LEVELS:
        return True
    for key, value in event.items():
        if "lost" in key or "dropped" in key:
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float | dict | list) and value:
                return True
    return False


def _log_problems(path: Path, limit: int = 5) -> list[str]:
    """Lines of a server log that report problems (first ``limit``, then a count)."""
    if not path.exists():
        return []
    hits = [
        line.strip()[:300]
        for line in path.read_text(errors="replace").splitlines()
        if _is_problem(line)
    ]
    return hits[:limit] + ([f"... and {len(hits) - limit} more"] if len(hits) > limit else [])


# -- progress -----------------------------------------------------------------------


class Progress:
    """One running line per contender (rewritten in place on a terminal)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()

    def update(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r\033[K" + text)
            self._stream.flush()

    def done(self, text: str) -> None:
        self._stream.write(("\r\033[K" if self._tty else "") + text + "\n")
        self._stream.flush()


# -- one contender ------------------------------------------------------------------


def _attribute(snapshot: TallySnapshot, workload: Workload, only: bool) -> tuple[int, int]:
    """(spans, roots) of the traces whose root is ``workload``'s route (all when ``only``)."""
    spans = roots = 0
    for key, tally in snapshot.by_root.items():
        if only or key == workload.path or workload.route in key:
            spans += tally.spans
            roots += tally.roots
    return spans, roots


def run_contender(
    contender: Contender,
    cfg: RunConfig,
    tool: str,
    progress: Progress,
    prefix: str = "",
    round_no: int = 1,
) -> ContenderResult:
    """Start, load, stop and count one contender; never raises for a contender's failure."""
    result = ContenderResult(
        name=contender.name,
        title=contender.title,
        traced=contender.traced,
        check_spans=contender.check_spans,
        round=round_no,
    )
    logs = cfg.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_name = contender.name if cfg.rounds == 1 else f"{contender.name}.{round_no}"
    log_path = logs / f"{log_name}.log"
    result.log = str(log_path)
    with contextlib.ExitStack() as stack:
        if contender.backends:
            progress.update(f"{prefix}{contender.name}: starting {', '.join(contender.backends)}")
            try:
                backends = stack.enter_context(start_backends(contender))
            except Exception as exc:  # a contender's failure: reported, the run goes on
                result.problems.append(f"{contender.name}: starting its servers failed: {exc}")
                progress.done(prefix + _summary_line(result))
                return result
        else:
            backends = {}
        snapshot = _run_server(contender, cfg, tool, progress, prefix, result, log_path, backends)
    _account(result, contender, snapshot)
    result.log_problems = _log_problems(log_path)
    progress.done(prefix + _summary_line(result))
    return result


def _run_server(
    contender: Contender,
    cfg: RunConfig,
    tool: str,
    progress: Progress,
    prefix: str,
    result: ContenderResult,
    log_path: Path,
    backends: Mapping[str, str],
) -> TallySnapshot:
    """Start the server, run its workloads, stop it; what its receiver tallied."""
    server_cpu = _SERVER_CPU if cfg.pin else None
    load_cpu = _LOAD_CPU if cfg.pin else None
    with (
        SpanReceiver() as receiver,
        MetricsReceiver() as metrics,
        tempfile.TemporaryDirectory(prefix="loadtest-db-") as db_dir,
        log_path.open("wb") as log,
    ):
        port = free_port()
        progress.update(f"{prefix}{contender.name}: starting")
        proc = start_server(
            contender,
            port,
            receiver.endpoint,
            db_dir,
            log,
            _taskset(server_cpu),
            metrics=metrics.endpoint,
            backends=backends,
        )
        try:
            wait_ready(port, proc, cfg.ready_timeout_s)
            for workload in contender.workloads:
                result.workloads.append(
                    _run_workload(
                        contender, workload, port, cfg, tool, load_cpu, progress, prefix, proc.pid
                    )
                )
        except RuntimeError as exc:
            result.problems.append(f"{contender.name}: {exc}")
        finally:
            progress.update(f"{prefix}{contender.name}: stopping")
            result.killed = stop_process(proc, cfg.stop_timeout_s)
            result.exit_code = proc.returncode
            if result.killed:
                result.notes.append(f"still running {cfg.stop_timeout_s:g} s after SIGTERM; killed")
        # The server drained its exporter before exiting; what is still on the wire lands now.
        if not receiver.wait_quiet(quiet_s=0.3, timeout_s=10.0):
            result.notes.append("receiver still busy 10 s after the server stopped")
        snapshot = receiver.snapshot()
        result.metrics_exports = metrics.export_requests
        result.metrics_requests = metrics.requests_counted
        if metrics.errors:
            result.problems.append(f"{contender.name}: {metrics.errors} unreadable metrics exports")
    return snapshot


def _run_workload(
    contender: Contender,
    workload: Workload,
    port: int,
    cfg: RunConfig,
    tool: str,
    cpu: int | None,
    progress: Progress,
    prefix: str,
    server_pid: int | None = None,
) -> WorkloadResult:
    out = WorkloadResult(
        contender=contender.name, workload=workload.name, path=workload.path, route=workload.route
    )
    spec = LoadSpec(
        port=port,
        path=workload.path,
        connections=cfg.connections,
        duration_s=cfg.warmup_s,
        max_requests=max(1, cfg.max_requests // 10),
    )
    name = f"{contender.name} {workload.path}"
    try:
        if cfg.warmup_s > 0:
            progress.update(f"{prefix}{name}: warming up {cfg.warmup_s:g} s")
            out.warmup_requests = run_load(spec, tool, cpu).requests
        progress.update(f"{prefix}{name}: load {cfg.duration_s:g} s, {cfg.connections} conns")
        measured = dataclasses.replace(
            spec, duration_s=cfg.duration_s, max_requests=cfg.max_requests
        )
        before = process_cpu(server_pid) if server_pid is not None else None
        out.load = run_load(measured, tool, cpu)
        after = process_cpu(server_pid) if server_pid is not None else None
        if before is not None and after is not None:
            out.server_cpu_s = after[0] - before[0]
            out.children_cpu_s = after[1] - before[1]
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        out.error = str(exc)
    return out


def _account(result: ContenderResult, contender: Contender, snapshot: TallySnapshot) -> None:
    result.spans = snapshot.spans
    result.root_server_spans = snapshot.root_server_spans
    result.export_requests = snapshot.export_requests
    result.decode_errors = snapshot.decode_errors
    result.rejected_requests = snapshot.rejected_requests
    only = len(contender.workloads) == 1
    attributed = 0
    for w in result.workloads:
        wl = next(x for x in contender.workloads if x.name == w.workload)
        w.spans, w.root_spans = _attribute(snapshot, wl, only)
        attributed += w.spans
    result.unattributed_spans = result.spans - attributed
    for w in result.workloads:
        if w.error:
            result.problems.append(f"{w.contender} {w.path}: load generator failed: {w.error}")
        elif w.load is None or w.load.requests == 0:
            result.problems.append(f"{w.contender} {w.path}: served no requests")
    if snapshot.decode_errors or snapshot.rejected_requests:
        result.problems.append(
            f"{contender.name}: receiver rejected {snapshot.rejected_requests} and could not "
            f"tally {snapshot.decode_errors} export requests {list(snapshot.rejected_detail)}"
        )
    served = result.requests_total
    lost = served - result.root_server_spans
    if contender.check_spans and served and lost > 0:
        result.problems.append(
            f"{contender.name}: lost spans: {result.root_server_spans} root SERVER spans "
            f"received for {served} completed requests ({lost} missing)"
        )
    elif contender.traced and served and lost > 0:
        result.notes.append(
            f"{result.root_server_spans} root SERVER spans for {served} requests "
            f"({lost} missing; not checked for peers)"
        )
    if contender.metrics and served and result.metrics_requests < served:
        # The warm-up's requests count too, so a complete report counts more than served.
        result.problems.append(
            f"{contender.name}: lost metrics: the server's duration histogram counted "
            f"{result.metrics_requests} requests in {result.metrics_exports} exports, "
            f"{served} were served"
        )
    elif contender.metrics:
        result.notes.append(
            f"metrics: {result.metrics_exports} exports, {result.metrics_requests} requests counted"
        )
    if not contender.traced and result.spans:
        result.notes.append(f"untraced but {result.spans} spans arrived")


def _summary_line(r: ContenderResult) -> str:
    parts = [f"{r.name}:"]
    for w in r.workloads:
        if w.load is not None:
            parts.append(
                f"{w.path} {w.load.rps:,.0f} req/s p99 {w.load.p99_ms:.2f} ms"
                f" ({w.load.requests} req, {w.load.errors} err)"
            )
    if r.traced or r.spans:
        parts.append(f"spans {r.spans} (roots {r.root_server_spans} / {r.requests_total} req)")
    parts.append("ok" if r.ok else "FAIL: " + "; ".join(r.problems))
    return " ".join(parts)


# -- all of them --------------------------------------------------------------------


@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Pin this process (and so the receiver's threads) to ``cpu`` for the block."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


@dataclass(slots=True, kw_only=True)
class Report:
    """One run of the load test: machine, configuration, per-contender results, ratios."""

    started: str
    elapsed_s: float
    machine: dict[str, object]
    config: dict[str, object]
    contenders: list[ContenderResult]
    ratios: dict[str, dict[str, float]]
    """Per route (``/items/{id}``, ``/blogs/posts/{id}``): req/s ratios, see :func:`ratios`
    (with several rounds, the median of the rounds' ratios)."""
    ratio_rounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """With several rounds: each ratio in every round, in round order (:func:`round_ratios`)."""
    p99_ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    """The same pairs' p99 latency ratios (lower is better; medians of the rounds)."""
    p99_ratio_rounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """With several rounds: each p99 ratio in every round, in round order."""

    @property
    def rounds(self) -> int:
        return max((c.round for c in self.contenders), default=1)

    @property
    def problems(self) -> list[str]:
        return [p for r in self.contenders for p in r.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "started": self.started,
            "elapsed_s": self.elapsed_s,
            "machine": self.machine,
            "config": self.config,
            "contenders": [r.to_dict() for r in self.contenders],
            "ratios": self.ratios,
            "ratio_rounds": self.ratio_rounds,
            "p99_ratios": self.p99_ratios,
            "p99_ratio_rounds": self.p99_ratio_rounds,
            "problems": self.problems,
            "ok": self.ok,
        }


def run_all(
    contenders: Sequence[Contender], cfg: RunConfig, progress: Progress | None = None
) -> Report:
    """Run every contender in turn, ``cfg.rounds`` times over: each round runs them all
    again, so a slow minute of the machine falls on every contender alike."""
    progress = progress or Progress()
    cfg = dataclasses.replace(cfg, pin=cfg.pin and can_pin())
    tool = available_tool(cfg.loadgen)
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    load_before = os.getloadavg()
    results: list[ContenderResult] = []
    with _pinned(_LOAD_CPU if cfg.pin else None):
        for round_no in range(1, cfg.rounds + 1):
            for i, contender in enumerate(contenders, 1):
                prefix = f"[{i}/{len(contenders)}] "
                if cfg.rounds > 1:
                    prefix = f"[round {round_no}/{cfg.rounds}] {prefix}"
                results.append(run_contender(contender, cfg, tool, progress, prefix, round_no))
    per_round = round_ratios(results)
    p99_per_round = round_ratios(results, "p99_ms")
    return Report(
        started=started.isoformat(timespec="seconds"),
        elapsed_s=round(time.monotonic() - clock, 1),
        machine=_machine(load_before),
        config={
            "duration_s": cfg.duration_s,
            "warmup_s": cfg.warmup_s,
            "connections": cfg.connections,
            "max_requests": cfg.max_requests,
            "loadgen": tool,
            "pinned": cfg.pin,
            "quick": cfg.quick,
            "rounds": cfg.rounds,
        },
        contenders=results,
        ratios=median_ratios(per_round),
        ratio_rounds=per_round if cfg.rounds > 1 else {},
        p99_ratios=median_ratios(p99_per_round),
        p99_ratio_rounds=p99_per_round if cfg.rounds > 1 else {},
    )


def _machine(load_before: tuple[float, float, float]) -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


# -- reporting ----------------------------------------------------------------------


Metric = Literal["rps", "p99_ms"]
"""What a ratio compares: req/s (higher is better) or p99 latency (lower is better)."""


def _metric(
    results: Sequence[ContenderResult], name: str, workload: str, metric: Metric
) -> float | None:
    """``metric`` (``rps`` or ``p99_ms``) of contender ``name`` on ``workload``, if it served it."""
    for r in results:
        if r.name == name:
            for w in r.workloads:
                if w.workload == workload and w.load is not None and w.load.requests:
                    return float(getattr(w.load, metric))
    return None


_PAIRS: dict[str, tuple[str, str]] = {
    "zerver-otlp / starlette": ("zerver-otlp", "starlette"),
    "zerver-otlp-normal / starlette": ("zerver-otlp-normal", "starlette"),
    "zerver-otlp / starlette-otel": ("zerver-otlp", "starlette-otel"),
    "zerver-otlp / floor-anyio": ("zerver-otlp", "floor-anyio"),
    "zerver-otlp / floor-protocol": ("zerver-otlp", "floor-protocol"),
    "zerver-otlp / zerver": ("zerver-otlp", "zerver"),
    "zerver-debug-jobs / zerver": ("zerver-debug-jobs", "zerver"),
    "zerver / starlette": ("zerver", "starlette"),
    "zerver-pg-redis / starlette-pg-redis": ("zerver-pg-redis", "starlette-pg-redis"),
    "zerver-pg-redis-otlp / starlette-pg-redis": ("zerver-pg-redis-otlp", "starlette-pg-redis"),
    "zerver-pg-redis-otlp / starlette-pg-redis-otel": (
        "zerver-pg-redis-otlp",
        "starlette-pg-redis-otel",
    ),
}
"""Ratio label -> (numerator, denominator) contender names."""


def ratios(results: Sequence[ContenderResult]) -> dict[str, dict[str, float]]:
    """req/s ratios per route, ``{"/items/{id}": {"zerver / starlette": 1.2, ...}, ...}``.

    Each pair of :data:`_PAIRS` is compared on every workload both of its
    contenders served (a route with no such pair is left out). Results of
    several rounds are compared within each round, and each ratio is the
    median of the rounds that have it.
    """
    return median_ratios(round_ratios(results))


def median_ratios(per_round: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Each ratio of :func:`round_ratios` as the median of its rounds."""
    return {
        route: {label: round(statistics.median(values), 3) for label, values in row.items()}
        for route, row in per_round.items()
    }


def round_ratios(
    results: Sequence[ContenderResult], metric: Metric = "rps"
) -> dict[str, dict[str, list[float]]]:
    """Each ratio of :func:`ratios` in every round that has both contenders, in round
    order; ``metric="p99_ms"`` gives the p99 latency ratios instead of req/s."""
    out: dict[str, dict[str, list[float]]] = {}
    for round_no in sorted({r.round for r in results}):
        in_round = [r for r in results if r.round == round_no]
        for route, row in _ratios_of(in_round, metric).items():
            into = out.setdefault(route, {})
            for label, value in row.items():
                into.setdefault(label, []).append(value)
    return out


def _ratios_of(results: Sequence[ContenderResult], metric: Metric) -> dict[str, dict[str, float]]:
    """The ratios of ``metric`` in one round."""
    routes: dict[str, str] = {}  # workload name -> route label, in the order they ran
    for r in results:
        for w in r.workloads:
            routes.setdefault(w.workload, w.route or w.path)
    out: dict[str, dict[str, float]] = {}
    for workload, route in routes.items():
        row: dict[str, float] = {}
        for label, (a, b) in _PAIRS.items():
            ra, rb = _metric(results, a, workload, metric), _metric(results, b, workload, metric)
            if ra is not None and rb:
                row[label] = round(ra / rb, 3)
        if row:
            out[route] = row
    return out


def _ratio_sections(
    report: Report,
) -> list[tuple[str, dict[str, float], Mapping[str, list[float]]]]:
    """(heading, ratios, each ratio's rounds) for every route: req/s first, then p99."""
    return [
        *(
            (f"req/s ratios on GET {route}", row, report.ratio_rounds.get(route, {}))
            for route, row in report.ratios.items()
        ),
        *(
            (
                f"p99 ratios on GET {route} (lower is better)",
                row,
                report.p99_ratio_rounds.get(route, {}),
            )
            for route, row in report.p99_ratios.items()
        ),
    ]


def ratio_lines(report: Report) -> list[str]:
    """One line per route: ``req/s ratios on GET <route>: a / b = 1.23, ...``, then one
    per route for p99 latency; with several rounds, each median is followed by the
    rounds' ratios."""
    return [
        f"{heading}: " + ", ".join(_ratio_text(k, v, rounds.get(k, [])) for k, v in row.items())
        for heading, row, rounds in _ratio_sections(report)
    ]


def _ratio_text(label: str, value: float, each: Sequence[float]) -> str:
    if len(each) < 2:
        return f"{label} = {value:.2f}"
    return f"{label} = {value:.2f} (rounds: {', '.join(f'{x:.2f}' for x in each)})"


def _row_name(report: Report, c: ContenderResult) -> str:
    """The contender's name, with its round when the run had several."""
    return c.name if report.rounds == 1 else f"{c.name} #{c.round}"


def format_table(report: Report) -> str:
    """The report's rows as a Markdown table, then the ratios."""
    lines = [
        "| contender | path | req/s | p50 ms | p99 ms | errors | requests | "
        "spans | spans/req | root spans / req | CPU µs/req server + children |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report.contenders:
        for w in c.workloads:
            load = w.load or LoadResult(tool="-", requests=0, duration_s=0.0)
            total = w.requests_total
            traced = c.traced or w.spans > 0
            spans = str(w.spans) if traced else "-"
            per = f"{w.spans / total:.2f}" if traced and total else "-"
            roots = f"{w.root_spans} / {total}" if traced else "-"
            cpu = w.cpu_us_per_request()
            cpu_cell = "-" if cpu is None else f"{cpu[0]:.0f} + {cpu[1]:.0f}"
            lines.append(
                f"| {_row_name(report, c)} | {w.path} | {load.rps:,.0f} | {load.p50_ms:.2f} | "
                f"{load.p99_ms:.2f} | {load.errors} | {load.requests} | {spans} | {per} | {roots} "
                f"| {cpu_cell} |"
            )
    if report.ratios or report.p99_ratios:
        lines.append("")
        lines.extend(ratio_lines(report))
    return "\n".join(lines)


def write_results(report: Report, out: Path) -> Path:
    """Save the report as ``loadtest-<time>.json`` (and ``latest.json``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"loadtest-{stamp}.json"
    text = json.dumps(report.to_dict(), indent=2)
    path.write_text(text)
    (out / "latest.json").write_text(text)
    return path


def write_svg(report: Report, path: Path) -> Path:
    """A dependency-free bar chart: req/s and p99 latency per contender and path, then
    the req/s and p99 ratios per route."""
    rows = [
        (
            f"{_row_name(report, c)} {w.path}",
            w.load.rps if w.load else 0.0,
            w.load.p99_ms if w.load else 0.0,
        )
        for c in report.contenders
        for w in c.workloads
    ]
    bar_h, gap, label_w, panel_w = 18, 6, 260, 300
    width = label_w + 2 * panel_w + 60
    notes = _wrap_ratios(report, max_chars=(width - 20) // 7)
    line_h = 16
    bars_end = 30 + len(rows) * (bar_h + gap)
    height = bars_end + 10 + (len(notes) * line_h + 10 if notes else 0)
    max_rps = max((r[1] for r in rows), default=0.0) or 1.0
    max_p99 = max((r[2] for r in rows), default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{label_w}" y="18" font-weight="bold">req/s (higher is better)</text>',
        f'<text x="{label_w + panel_w + 30}" y="18" font-weight="bold">'
        "p99 latency ms (lower is better)</text>",
    ]
    for i, (label, rps, p99) in enumerate(rows):
        y = 30 + i * (bar_h + gap)
        w1 = rps / max_rps * (panel_w - 60)
        w2 = p99 / max_p99 * (panel_w - 60)
        x2 = label_w + panel_w + 30
        parts += [
            f'<text x="{label_w - 8}" y="{y + 13}" text-anchor="end">{_xml(label)}</text>',
            f'<rect x="{label_w}" y="{y}" width="{w1:.1f}" height="{bar_h}" fill="#4477aa"/>',
            f'<text x="{label_w + w1 + 4:.1f}" y="{y + 13}">{rps:,.0f}</text>',
            f'<rect x="{x2}" y="{y}" width="{w2:.1f}" height="{bar_h}" fill="#cc6677"/>',
            f'<text x="{x2 + w2 + 4:.1f}" y="{y + 13}">{p99:.2f}</text>',
        ]
    for i, (text, bold) in enumerate(notes):
        y = bars_end + 14 + i * line_h
        weight = ' font-weight="bold"' if bold else ""
        indent = 10 if bold else 24
        parts.append(f'<text x="{indent}" y="{y}"{weight}>{_xml(text)}</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


def _wrap_ratios(report: Report, max_chars: int) -> list[tuple[str, bool]]:
    """The chart's ratio lines: a heading per route, then its ratios wrapped to ``max_chars``."""
    out: list[tuple[str, bool]] = []
    for heading, row, rounds in _ratio_sections(report):
        out.append((heading, True))
        line = ""
        for k, v in row.items():
            item = _ratio_text(k, v, rounds.get(k, []))
            if line and len(line) + 2 + len(item) > max_chars:
                out.append((line + ",", False))
                line = ""
            line = f"{line}, {item}" if line else item
        if line:
            out.append((line, False))
    return out


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
