"""Real ``zerver run`` processes for the durability tests: start, load, signal, kill.

Every request carries a ``traceparent`` with a fresh trace id, so a test knows
exactly which traces must arrive at the receiver; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from zerver.export import OtlpReceiver, Spool

TESTS_DIR = Path(__file__).resolve().parent
START_S = 20.0
"""Bound on a server's start (importing zerver and spawning its exporter process)."""


def server_trace_ids(receiver: OtlpReceiver) -> set[str]:
    """Trace ids of the SERVER spans the receiver accepted (duplicates merged)."""
    return {
        s["traceId"]
        for s in receiver.spans()
        if s.get("kind") in (2, "SPAN_KIND_SERVER") and s["name"].startswith("http.server")
    }


def spool_stats(directory: Path) -> tuple[int, int]:
    """(items, spans or records) in the spool at ``directory``, read by a Spool of our own."""
    if not (directory / "spool.sqlite3").exists():
        return 0, 0
    with Spool(directory, max_bytes=1 << 40) as spool:
        stats = spool.statistics()
    return stats.items, stats.count


def spooled_spans(directory: Path, spans_per_record: int) -> int:
    """Spans the spool holds, counting each spooled record as ``spans_per_record``."""
    if not (directory / "spool.sqlite3").exists():
        return 0
    with Spool(directory, max_bytes=1 << 40) as spool:
        by_kind = spool.statistics().count_by_kind
    return by_kind.get("otlp", 0) + by_kind.get("records", 0) * spans_per_record


def wait_until(condition: Any, timeout: float, what: str, step_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step_s)


class Server:
    """``zerver run durability_app:app`` in its own session, with JSON logs collected."""

    def __init__(self, tmp_path: Path, env: Mapping[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ZER_VER_"))},
            "ZER_VER_LOG_FORMAT": "json",
            "ZER_VER_ACCESS_LOG": "0",
            "ZER_VER_DB_PATH": str(tmp_path / "app.sqlite3"),
            "ZER_VER_EXPORT_SPOOL_DIR": str(tmp_path / "spool"),
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            **env,
        }
        self.lines: list[str] = []
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to listen."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zerver", "run", "durability_app:app", "--port", "0"],
            cwd=TESTS_DIR,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self.proc

    def start(self) -> Server:
        self.launch()
        started = self.wait_event("server started", START_S)
        self.port = int(started["port"])
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    out.append(event)
        return out

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            assert self.proc is not None
            found[:] = self.events(name)
            if not found and self.proc.poll() is not None:
                raise AssertionError(f"server exited before {name!r}:\n{self.output()}")
            return bool(found)

        wait_until(seen, timeout, repr(name))
        return found[0]

    def output(self) -> str:
        return "\n".join(self.lines)

    def get(self, n: int) -> list[str]:
        """``n`` traced requests on one keep-alive connection; their trace ids."""
        ids = []
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            for i in range(n):
                trace_id = secrets.token_hex(16)
                headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
                conn.request("GET", f"/hello/{i}", headers=headers)
                response = conn.getresponse()
                response.read()
                assert response.status == 200
                ids.append(trace_id)
        finally:
            conn.close()
        return ids

    def exporter_pid(self) -> int:
        """The exporter process (a child of the server running multiprocessing's spawn)."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
        raise AssertionError("no exporter process")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> tuple[int, float]:
        """(exit code, seconds it took)."""
        assert self.proc is not None
        t0 = time.monotonic()
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code, time.monotonic() - t0

    def stop(self, timeout: float = 30.0) -> tuple[int, float]:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill_all(self) -> None:
        """SIGKILL the whole session (server and exporter process): a crash."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_all()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def server(tmp_path: Path, env: Mapping[str, str]) -> Iterator[Server]:
    s = Server(tmp_path, env)
    try:
        yield s.start()
    finally:
        s.close()
