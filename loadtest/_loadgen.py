"""Load generators: wrk (when installed) or a bounded Python keep-alive client.

Both run in their own process (pinned to a CPU with ``taskset`` when asked)
and report one :class:`LoadResult`. How requests are counted:

* **wrk**: a Lua script counts responses in ``response()`` and stops the
  thread at the request bound; its ``done()`` prints wrk's own summary
  (``summary.requests`` = responses fully received within the run,
  ``summary.errors`` = socket connect/read/write/timeout errors plus
  ``status`` = non-2xx/3xx responses) and latency percentiles, as JSON.
  Requests still in flight when wrk stops are not counted.
* **python** (``python -m loadtest._loadgen``): ``connections`` keep-alive
  connections each send one request at a time (no pipelining) until the
  deadline or the request bound; a response counts when its whole body
  (``Content-Length``) has arrived. Requests in flight at the deadline are
  awaited for at most ``timeout_s`` and then counted as socket errors.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LoadResult",
    "LoadSpec",
    "available_tool",
    "run_load",
    "run_python_load",
]

_MARK = "LOADTEST_JSON "
_MAX_HEADER = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    """One bounded load run against ``http://host:port{path}``."""

    host: str = "127.0.0.1"
    port: int
    path: str
    connections: int = 64
    duration_s: float = 2.0
    max_requests: int = 200_000
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    """What a load generator measured (latencies in milliseconds)."""

    tool: str
    requests: int
    """Responses fully received (any status)."""
    non_2xx: int = 0
    socket_errors: int = 0
    duration_s: float
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["rps"] = round(self.rps, 1)
        d["errors"] = self.errors
        return d

    @classmethod
    def from_json(cls, text: str) -> LoadResult:
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def available_tool(preferred: str = "auto") -> str:
    """``wrk`` when asked for (or ``auto``) and on PATH, else ``python``."""
    if preferred == "python":
        return "python"
    if shutil.which("wrk") is not None:
        return "wrk"
    if preferred == "wrk":
        raise RuntimeError("--loadgen wrk was asked for but wrk is not on PATH")
    return "python"


def run_load(spec: LoadSpec, tool: str, cpu: int | None = None) -> LoadResult:
    """Run one load in a separate process (pinned to ``cpu`` via taskset) and wait for it.

    Bounded: the process is killed ``timeout_s + 10`` seconds after its duration.
    """
    prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp:
        if tool == "wrk":
            script = Path(tmp) / "count.lua"
            script.write_text(_WRK_LUA)
            # wrk has no request bound of its own: the script stops at a per-thread limit.
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
        else:
            argv = [
                sys.executable,
                "-m",
                "loadtest._loadgen",
                "--host",
                spec.host,
                "--port",
                str(spec.port),
                "--path",
                spec.path,
                "--connections",
                str(spec.connections),
                "--duration",
                str(spec.duration_s),
                "--max-requests",
                str(spec.max_requests),
                "--timeout",
                str(spec.timeout_s),
            ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
        )
        proc = subprocess.run(
            prefix + argv,
            capture_output=True,
            text=True,
            timeout=spec.duration_s + spec.timeout_s + 10,
            env=env,
            check=False,
        )
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            raw = json.loads(line[len(_MARK) :])
            if tool == "wrk":
                return _from_wrk(raw)
            return LoadResult.from_json(json.dumps(raw))
    raise RuntimeError(
        f"{tool} exited with {proc.returncode} and no result; stderr: {proc.stderr.strip()[-500:]}"
    )


# -- wrk ----------------------------------------------------------------------------

_WRK_LUA = """
local limit = 0
local count = 0
function init(args)
  limit = tonumber(args[1]) or 0
end
function response(status, headers, body)
  count = count + 1
  if limit > 0 and count >= limit then
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADTEST_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "timeout": %d, "status": %d, "p50_us": %d, "p99_us": %d, '
    .. '"mean_us": %.1f, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50.0), latency:percentile(99.0), latency.mean, latency.max))
end
"""


def _from_wrk(raw: dict[str, float]) -> LoadResult:
    return LoadResult(
        tool="wrk",
        requests=int(raw["requests"]),
        non_2xx=int(raw["status"]),
        socket_errors=int(raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]),
        duration_s=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


# -- the Python generator -----------------------------------------------------------


class _Run:
    """Shared counters and bounds of one Python load run."""

    __slots__ = (
        "deadline",
        "latencies",
        "max_requests",
        "non_2xx",
        "request",
        "requests",
        "sent",
        "socket_errors",
    )

    def __init__(self, spec: LoadSpec) -> None:
        self.request = (
            f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
            "User-Agent: loadtest\r\nAccept: */*\r\n\r\n"
        ).encode("ascii")
        self.deadline = time.monotonic() + spec.duration_s
        self.max_requests = spec.max_requests
        self.latencies = array.array("d")
        self.requests = 0
        self.sent = 0
        self.non_2xx = 0
        self.socket_errors = 0

    def may_send(self) -> bool:
        return self.sent < self.max_requests and time.monotonic() < self.deadline


class _Client(asyncio.Protocol):
    """One keep-alive connection sending a request whenever the previous one completed."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._buf = bytearray()
        self._need = -1  # total bytes of the current response, once its header is parsed
        self._status_ok = True
        self._t0 = 0.0
        self._in_flight = False
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # TCP connections are stream transports
        self._transport = transport
        self._send()

    def _send(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if not self._run.may_send():
            transport.close()
            return
        self._run.sent += 1
        self._in_flight = True
        self._t0 = time.perf_counter()
        transport.write(self._run.request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while self._in_flight:
            if self._need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEADER:
                        self._fail()
                    return
                head = bytes(buf[:end]).lower()
                self._status_ok = head[9:10] == b"2"
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self._fail()  # chunked or close-delimited bodies are not supported
                    return
                stop = head.find(b"\r\n", at + 2)
                try:
                    length = int(head[at + 17 : stop if stop >= 0 else None])
                except ValueError:
                    self._fail()
                    return
                self._need = end + 4 + length
            if len(buf) < self._need:
                return
            del buf[: self._need]
            self._need = -1
            self._complete()

    def _complete(self) -> None:
        run = self._run
        run.latencies.append(time.perf_counter() - self._t0)
        run.requests += 1
        if not self._status_ok:
            run.non_2xx += 1
        self._in_flight = False
        self._send()

    def _fail(self) -> None:
        if self._in_flight:
            self._run.socket_errors += 1
            self._in_flight = False
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._in_flight:
            self._run.socket_errors += 1
            self._in_flight = False
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)


async def _connection(spec: LoadSpec, run: _Run, clients: list[_Client]) -> None:
    loop = asyncio.get_running_loop()
    while run.may_send():
        try:
            _, client = await loop.create_connection(lambda: _Client(run), spec.host, spec.port)
        except OSError:
            run.socket_errors += 1
            await asyncio.sleep(0.05)
            continue
        clients.append(client)
        await client.closed


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def run_python_load(spec: LoadSpec) -> LoadResult:
    """Drive ``spec`` from this event loop; bounded by ``duration_s + timeout_s``."""
    run = _Run(spec)
    clients: list[_Client] = []
    start = time.perf_counter()
    tasks = [asyncio.create_task(_connection(spec, run, clients)) for _ in range(spec.connections)]
    _, pending = await asyncio.wait(tasks, timeout=spec.duration_s + spec.timeout_s)
    for client in clients:
        client.abort()  # stragglers: counted as socket errors by connection_lost
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - start
    lat = sorted(run.latencies)
    return LoadResult(
        tool="python",
        requests=run.requests,
        non_2xx=run.non_2xx,
        socket_errors=run.socket_errors,
        duration_s=elapsed,
        p50_ms=_percentile(lat, 50) * 1000,
        p99_ms=_percentile(lat, 99) * 1000,
        mean_ms=(sum(lat) / len(lat) * 1000) if lat else 0.0,
        max_ms=(lat[-1] * 1000) if lat else 0.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest._loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    spec = LoadSpec(
        host=args.host,
        port=args.port,
        path=args.path,
        connections=args.connections,
        duration_s=args.duration,
        max_requests=args.max_requests,
        timeout_s=args.timeout,
    )
    result = asyncio.run(run_python_load(spec))
    print(_MARK + json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
