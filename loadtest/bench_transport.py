"""Micro-benchmark of zerver's server transports against a bare h11 floor, in one run.

Serves a constant small JSON body (``GET /items/42``) with each contender in
its own process pinned to CPU 0 (``taskset``, when present) and drives it with
wrk pinned to CPU 1 (a bounded Python keep-alive client when wrk is missing):

* ``floor``: ``loadtest.apps.h11_floor --transport protocol`` (h11 on an
  asyncio Protocol, no framework);
* ``streams`` / ``protocol``: zerver's server (``zerver.http._server.serve``) on
  each transport, with a constant ``ServerApp`` (``--app bare``) or a zerver
  ``App`` with one ``@step`` route and default telemetry (``--app zerver``).

Contenders take turns within each round, so drift on a shared machine hits
them alike; the table shows each one's median over the rounds. Besides req/s
it reports the server's CPU time per request (user + system, from
``/proc/<pid>/stat``), which other load on a shared machine disturbs far less
than throughput.

    python -m loadtest.bench_transport [--rounds 5] [--duration 5] [--app bare]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from zerver import App, Context, Decision, Done, Request, Response, step
from zerver.http._server import ServerApp, ServerConfig

__all__ = ["main"]

PATH = "/items/42"
BODY = b'{"id":"42","name":"item 42"}'
_SERVER_CPU = "0"
_CLIENT_CPU = "1"
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 15.0
_WRK = "/usr/bin/wrk"


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    argv: tuple[str, ...]


def _contenders(app: str, names: Sequence[str]) -> list[Contender]:
    py = sys.executable
    every = {
        "floor": Contender(
            "floor", (py, "-m", "loadtest.apps.h11_floor", "--transport", "protocol", "--port")
        ),
        "streams": Contender(
            "streams",
            (py, "-m", "loadtest.bench_transport", "--serve", "streams", "--app", app, "--port"),
        ),
        "protocol": Contender(
            "protocol",
            (py, "-m", "loadtest.bench_transport", "--serve", "protocol", "--app", app, "--port"),
        ),
    }
    return [every[n] for n in names]


# ------------------------------------------------------------------ servers


class _BareApp:
    """A ``ServerApp`` answering every request with the same JSON body."""

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        yield

    async def dispatch(self, request: Request) -> Response:
        return Response(200, BODY, [("content-type", "application/json")])


def _zerver_app() -> App:
    @step
    def get_item(ctx: Context) -> Decision:
        item_id = ctx.params["id"]
        return Done(Response.json({"id": item_id, "name": f"item {item_id}"}))

    app = App("bench")
    app.get("/items/{id}", get_item)
    return app


def _serve(transport: Literal["streams", "protocol"], app_kind: str, port: int) -> int:
    from zerver.http._server import run

    app: ServerApp = _BareApp() if app_kind == "bare" else _zerver_app()
    run(app, ServerConfig(host="127.0.0.1", port=port, transport=transport))
    return 0


# ------------------------------------------------------------------- runner


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pinned(cpu: str, argv: Sequence[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", cpu, *argv] if taskset else list(argv)


@dataclass(frozen=True, slots=True)
class Sample:
    rps: float
    cpu_us: float
    """Server CPU time (user + system) per request, in microseconds; NaN if unknown."""


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (NaN where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return float("nan")
    # After the command: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


@contextlib.contextmanager
def _running(contender: Contender) -> Iterator[tuple[int, int]]:
    port = _free_port()
    argv = _pinned(_SERVER_CPU, [*contender.argv, str(port)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ZER_VER_"))}
    env["ZER_VER_ACCESS_LOG"] = "0"
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=os.getcwd()
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{contender.name} exited at start: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{contender.name} did not listen in time") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_COUNT = re.compile(r"(\d+) requests in")


def _wrk(port: int, duration: float, connections: int) -> tuple[float, int]:
    """(req/s, requests completed)."""
    argv = _pinned(
        _CLIENT_CPU,
        [
            _WRK,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "5s",
            f"http://127.0.0.1:{port}{PATH}",
        ],
    )
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=duration + 30
    ).stdout
    rps, count = _RPS.search(out), _COUNT.search(out)
    if rps is None or count is None:
        raise RuntimeError(f"cannot read wrk's output: {out}")
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning: wrk reported errors:\n{out}", file=sys.stderr)
    return float(rps.group(1)), int(count.group(1))


def _python_load(port: int, duration: float, connections: int) -> tuple[float, int]:
    """(req/s, requests completed)."""
    argv = _pinned(
        _CLIENT_CPU,
        [
            sys.executable,
            "-m",
            "loadtest.bench_transport",
            "--client",
            str(port),
            "--duration",
            str(duration),
            "--connections",
            str(connections),
        ],
    )
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=duration + 30
    ).stdout
    rps, count = out.split()[-2:]
    return float(rps), int(count)


async def _client(port: int, duration: float, connections: int) -> tuple[float, int]:
    """Keep-alive connections, one request in flight each, until ``duration``; req/s."""
    request = f"GET {PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    deadline = time.monotonic() + duration
    counts = [0] * connections

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
                await reader.readexactly(int(match.group(1)) if match else 0)
                counts[index] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    start = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(one(i) for i in range(connections))), timeout=duration + 10
    )
    return sum(counts) / (time.monotonic() - start), sum(counts)


def _measure(contenders: Sequence[Contender], args: argparse.Namespace) -> dict[str, list[Sample]]:
    load = _wrk if os.access(_WRK, os.X_OK) and not args.python_client else _python_load
    print(f"load generator: {'wrk' if load is _wrk else 'python'}; connections={args.connections}")
    results: dict[str, list[Sample]] = {c.name: [] for c in contenders}
    for round_no in range(1, args.rounds + 1):
        # Rotate the order so no contender always runs first (or last) in a round.
        shift = (round_no - 1) % len(contenders)
        for contender in [*contenders[shift:], *contenders[:shift]]:
            with _running(contender) as (port, pid):
                load(port, min(1.0, args.duration), args.connections)  # warm-up
                before = _cpu_seconds(pid)
                rps, count = load(port, args.duration, args.connections)
                cpu = _cpu_seconds(pid) - before
            sample = Sample(rps, cpu / count * 1e6 if count else float("nan"))
            results[contender.name].append(sample)
            print(
                f"  round {round_no}/{args.rounds} {contender.name:9} {rps:10.0f} req/s"
                f" {sample.cpu_us:8.1f} us CPU/req"
            )
    return results


def _report(results: dict[str, list[Sample]], app: str) -> None:
    rps = {name: statistics.median(s.rps for s in samples) for name, samples in results.items()}
    cpu = {name: statistics.median(s.cpu_us for s in samples) for name, samples in results.items()}
    rounds = len(next(iter(results.values())))
    print(f"\napp={app}; medians over {rounds} rounds")
    print(
        f"{'contender':10} {'req/s':>8} {'min':>8} {'max':>8} {'/floor':>7} {'/streams':>9}"
        f" {'us CPU/req':>11} {'req/CPU-s':>10}"
    )
    for name, samples in results.items():
        floor, streams = rps.get("floor"), rps.get("streams")
        vs_floor = f"{rps[name] / floor:7.2f}" if floor else f"{'-':>7}"
        vs_streams = f"{rps[name] / streams:9.2f}" if streams else f"{'-':>9}"
        print(
            f"{name:10} {rps[name]:8.0f} {min(s.rps for s in samples):8.0f}"
            f" {max(s.rps for s in samples):8.0f} {vs_floor} {vs_streams}"
            f" {cpu[name]:11.1f} {1e6 / cpu[name]:10.0f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_transport")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--app", choices=["bare", "zerver"], default="bare")
    parser.add_argument(
        "--contenders",
        default="floor,streams,protocol",
        help="comma-separated subset of floor, streams, protocol",
    )
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    # Internal: the server and client processes.
    parser.add_argument("--serve", choices=["streams", "protocol"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return _serve(args.serve, args.app, args.port)
    if args.client:
        rps, count = asyncio.run(_client(args.client, args.duration, args.connections))
        print(rps, count)
        return 0
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        parser.error("--rounds, --duration and --connections must be positive")
    contenders = _contenders(args.app, args.contenders.split(","))
    _report(_measure(contenders, args), args.app)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
