"""A fault run on the blog route: the collector goes away and comes back, and the
exporter process is killed, while the server is under load. Every request's trace
must still arrive.

Run: ``python -m loadtest.fault_run [--duration 30] [--connections 64]``.

zerver as the load test's ``zerver-otlp`` contender runs it (default telemetry,
OTLP/HTTP JSON, its own spool), pinned to CPU 0, with the load generator on CPU 1
when the machine has two. The faults follow a timeline in fractions of the load:
the collector stops listening at 20 % and listens again at 45 %; at 60 % the
exporter process gets SIGKILL (the server restarts it and sends it again every
batch it had not acknowledged). After the load the run waits, bounded, until the
receiver holds a trace for every request the load generator counted, then stops
the server with SIGTERM and reads its closing ``trace export stopped`` line.

Exit status 0 when every request's trace arrived and the server's closing line
counts no record or span lost or dropped; 1 otherwise. A trace may arrive twice
(delivery is at least once), so traces are counted by trace id.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ._contenders import BLOG, by_name
from ._loadgen import LoadSpec, available_tool, run_load
from ._receiver import SpanReceiver
from ._runner import _pinned, can_pin, free_port, start_server, stop_process, wait_ready

__all__ = ["Timeline", "main"]

_SERVER_CPU, _LOAD_CPU = 0, 1


class Timeline:
    """The faults, at fractions of the load's duration (a thread of their own)."""

    def __init__(self, receiver: SpanReceiver, server_pid: int, duration_s: float) -> None:
        self._receiver = receiver
        self._server_pid = server_pid
        self._duration_s = duration_s
        self._stop = threading.Event()
        self.events: list[str] = []
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        self._thread.join()

    def _at(self, fraction: float, start: float) -> bool:
        """Wait until ``fraction`` of the load has passed; False if stopped first."""
        left = start + fraction * self._duration_s - time.monotonic()
        return not self._stop.wait(max(0.0, left))

    def _run(self) -> None:
        start = time.monotonic()
        if not self._at(0.20, start):
            return
        self._receiver.go_down()
        self.events.append(f"{time.monotonic() - start:5.1f} s: collector down")
        if not self._at(0.45, start):
            return
        self._receiver.come_back()
        self.events.append(f"{time.monotonic() - start:5.1f} s: collector back")
        if not self._at(0.60, start):
            return
        killed = _kill_children(self._server_pid)
        self.events.append(f"{time.monotonic() - start:5.1f} s: exporter process killed {killed}")


def _kill_children(pid: int) -> list[int]:
    """SIGKILL the exporter process, a child of ``pid`` (not multiprocessing's
    resource tracker, its other child); the pids killed."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            children += [int(c) for c in text.split()]
    children = [c for c in children if b"resource_tracker" not in _cmdline(c)]
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    return children


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _closing_line(log_path: Path) -> dict[str, object]:
    """The server's ``trace export stopped`` line (JSON), or {} when it wrote none."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "trace export stopped":
                return event
    return {}


def _losses(closing: dict[str, object]) -> dict[str, object]:
    """What the closing line counts as lost or dropped (non-zero values only)."""
    return {k: v for k, v in closing.items() if ("lost" in k or "dropped" in k) and v}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.fault_run", description=__doc__)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for traces (300)")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument(
        "--contender",
        choices=["zerver-otlp", "zerver-otlp-normal"],
        default="zerver-otlp",
        help="the load test's contender to run (zerver-otlp)",
    )
    p.add_argument(
        "--spool-mb",
        type=int,
        help="ZER_VER_EXPORT_SPOOL_MAX_MB for the server (default: its own, 256)",
    )
    args = p.parse_args(argv)
    contender = by_name([args.contender])[0]
    if args.spool_mb is not None:
        spool = {"ZER_VER_EXPORT_SPOOL_MAX_MB": str(args.spool_mb)}
        contender = dataclasses.replace(contender, env={**contender.env, **spool})
    pin = can_pin()
    tool = available_tool(args.loadgen)
    with (
        _pinned(_LOAD_CPU if pin else None),  # the receiver beside the load generator
        SpanReceiver() as receiver,
        tempfile.TemporaryDirectory(prefix="fault-run-") as tmp,
    ):
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            port = free_port()
            prefix = ["taskset", "-c", str(_SERVER_CPU)] if pin else []
            proc = start_server(contender, port, receiver.endpoint, tmp, log, prefix)
            try:
                wait_ready(port, proc, 30.0)
                faults = Timeline(receiver, proc.pid, args.duration)
                spec = LoadSpec(
                    port=port,
                    path=BLOG.path,
                    connections=args.connections,
                    duration_s=args.duration,
                    max_requests=10_000_000,
                )
                faults.start()
                load = run_load(spec, tool, _LOAD_CPU if pin else None)
                faults.join()
                arrived = _wait_for_traces(receiver, load.requests, args.wait)
            finally:
                killed = stop_process(proc, 60.0)
        receiver.wait_quiet(quiet_s=0.3, timeout_s=10.0)
        traces = receiver.snapshot().by_root.get(BLOG.route)
        closing = _closing_line(log_path)
    roots = traces.roots if traces is not None else 0
    for event in faults.events:
        print(event)
    print(
        f"load: {load.requests} requests in {load.duration_s:.1f} s "
        f"({load.requests / max(load.duration_s, 1e-9):,.0f} req/s, p99 {load.p99_ms:.2f} ms), "
        f"{load.non_2xx} not 2xx, {load.socket_errors} socket errors"
    )
    print(f"traces of GET {BLOG.route}: {roots}, waited {arrived:.1f} s after the load")
    print(f"server: exit {proc.returncode}{' (killed)' if killed else ''}; closing line {closing}")
    losses = _losses(closing)
    ok = (
        roots >= load.requests
        and load.non_2xx == 0
        and not losses
        and bool(closing)
        and proc.returncode == 0
    )
    print("ok" if ok else f"FAILED: losses {losses}")
    return 0 if ok else 1


def _wait_for_traces(receiver: SpanReceiver, requests: int, timeout_s: float) -> float:
    """Seconds until the receiver holds ``requests`` traces of the blog route (bounded)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        tally = receiver.snapshot().by_root.get(BLOG.route)
        if tally is not None and tally.roots >= requests:
            break
        time.sleep(0.5)
    return time.monotonic() - start


if __name__ == "__main__":
    sys.exit(main())
