"""Instructions per request of each contender's server, counted by callgrind.

``python -m loadtest.bench_instructions [--only NAME ...] [--path blog|items]
[--requests N] [--warmup N] [--connections N]``

Wall-clock figures on a shared virtual machine move by ±20 % from one minute
to the next, for the same server; instruction counts do not. This runs each
contender's real server (the same command and environment as ``python -m
loadtest``) under ``valgrind --tool=callgrind`` with instrumentation off,
warms it up, switches instrumentation on (``callgrind_control -i on``), sends
a bounded number of requests over real sockets (the Python load generator,
which stops at the bound), dumps the counters and stops the server. What is counted is the
user-space instructions of the server process (all its threads: the event
loop, SQLite's and the thread pool's) and, separately, of its child processes
(zerver's exporter process), divided by the responses received. Kernel time
(system calls, the loopback) is not in it; both servers make about the same
calls per request.

Slow: a server under callgrind answers some tens of requests a second, so a
contender takes one to three minutes. Not part of CI. At that rate zerver's
exporter process gets a few records per batch, so its per-batch work (pipe
messages, acknowledgements, an HTTP post, thread wake-ups) is spread over few
requests: the child-process figure is an upper bound, about twice what
``python -m loadtest.bench_exporter --instructions`` counts for unpacking,
building and encoding a blog record (1 423 k against ~724 k, 2026-12-04).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ._contenders import BLOG, ITEMS, Contender, by_name
from ._loadgen import LoadSpec, run_load
from ._receiver import SpanReceiver
from ._runner import free_port, start_server, stop_process, wait_ready

__all__ = ["Count", "count_contender", "main"]

_TOOL = "python"
"""The Python load generator: it ends at the request bound (wrk sleeps out its duration)."""


@dataclass(frozen=True, slots=True)
class Count:
    contender: str
    path: str
    requests: int
    server: int
    """Instructions of the server process while the measured requests ran."""
    children: int
    """Instructions of its child processes meanwhile (zerver's exporter process)."""

    def per_request(self) -> tuple[float, float]:
        return self.server / self.requests, self.children / self.requests


def _totals(directory: Path) -> dict[int, int]:
    """Instructions per process id from the dumps ``callgrind_control -d`` asked for.

    Those are ``cg.<pid>.<n>``; ``cg.<pid>`` is the dump at exit, after
    instrumentation was switched off again, and is not read.
    """
    found: dict[int, int] = {}
    for dump in directory.glob("cg.*.*"):
        pid = int(dump.name.split(".")[1])
        for line in dump.read_text(errors="replace").splitlines():
            m = re.match(r"totals:\s+(\d+)", line)
            if m:
                found[pid] = found.get(pid, 0) + int(m.group(1))
                break
    return found


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, timeout=120, check=False)


def count_contender(
    contender: Contender, path: str, *, requests: int, warmup: int, connections: int
) -> Count:
    """Run one contender under callgrind and count the measured requests' instructions."""
    with SpanReceiver() as receiver, tempfile.TemporaryDirectory(prefix="zerver-ir-") as tmp:
        dumps = Path(tmp) / "dumps"
        dumps.mkdir()
        port = free_port()
        callgrind = (
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--trace-children=yes",
            f"--callgrind-out-file={dumps}/cg.%p",
        )
        with (Path(tmp) / "server.log").open("wb") as log:
            proc = start_server(contender, port, receiver.endpoint, tmp, log, callgrind)
            try:
                wait_ready(port, proc, 300.0)
                spec = LoadSpec(
                    port=port,
                    path=path,
                    connections=connections,
                    duration_s=900.0,
                    max_requests=warmup,
                    timeout_s=60.0,
                )
                run_load(spec, _TOOL)
                time.sleep(1.0)  # let the warm-up's telemetry settle before counting
                _control("-i", "on")
                measured = run_load(dataclasses.replace(spec, max_requests=requests), _TOOL)
                if contender.traced:
                    time.sleep(3.0)  # the exporter builds and sends what the requests left
                _control("-d")
                _control("-i", "off")
            finally:
                stop_process(proc, 120.0)
        if measured.errors or not measured.requests:
            raise RuntimeError(
                f"{contender.name}: {measured.errors} errors, {measured.requests} responses"
            )
        totals = _totals(dumps)
        server = totals.pop(proc.pid, 0)
        if not server:
            raise RuntimeError(f"{contender.name}: no dump from the server process")
        return Count(contender.name, path, measured.requests, server, sum(totals.values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_instructions", description=__doc__)
    p.add_argument("--only", nargs="+", default=["starlette", "zerver", "zerver-otlp"])
    p.add_argument("--path", choices=["blog", "items"], default="blog")
    p.add_argument("--requests", type=int, default=1000, help="measured requests (1000)")
    p.add_argument("--warmup", type=int, default=300, help="warm-up requests (300)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections (32)")
    args = p.parse_args(argv)
    try:
        contenders = by_name(args.only)
    except ValueError as exc:
        print(f"bench_instructions: {exc}", file=sys.stderr)
        return 2
    workload = BLOG if args.path == "blog" else ITEMS
    for c in contenders:
        if workload not in c.workloads:
            continue
        t0 = time.monotonic()
        count = count_contender(
            c,
            workload.path,
            requests=args.requests,
            warmup=args.warmup,
            connections=args.connections,
        )
        server, children = count.per_request()
        print(
            f"{c.name:18} {workload.path}: {server / 1e3:8,.0f} k instructions / request "
            f"in the server, {children / 1e3:6,.0f} k in child processes "
            f"({count.requests} requests, {time.monotonic() - t0:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
