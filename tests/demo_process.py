"""Run ``zerver demo`` as a real process for tests: start, find its port, always stop."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import orjson


@contextlib.contextmanager
def demo_process(
    env: Mapping[str, str], cwd: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``zerver demo --port 0`` with JSON logs; yields the process and its bound port.

    The process is killed if the block leaves it running; its pipes are closed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "zerver", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "ZER_VER_LOG_FORMAT": "json"},
        cwd=cwd,
    )
    try:
        assert proc.stdout is not None
        port = 0
        for _ in range(50):  # bounded: the start-up line comes first
            line = proc.stdout.readline()
            if not line:
                break
            event = orjson.loads(line)
            if event.get("event") == "server started":
                port = int(event["port"])
                break
        assert port, proc.stderr.read() if proc.stderr else "no start-up line"
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
