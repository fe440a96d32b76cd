"""Run ``zerver`` as a real process for tests: start, find its port, always stop."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson


def operator_env(modules: Path, state_home: Path, **extra: str) -> dict[str, str]:
    """This environment without ``ZER_VER_*`` variables, ``modules`` first on
    ``PYTHONPATH``, no trace export, JSON logs and the state directory at
    ``state_home``; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ZER_VER_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(modules), *filter(None, [env.get("PYTHONPATH")])]),
        OTEL_TRACES_EXPORTER="none",
        ZER_VER_LOG_FORMAT="json",
        XDG_STATE_HOME=str(state_home),
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def zerver_process(
    args: Sequence[str], env: Mapping[str, str], cwd: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, list[dict[str, Any]]]]:
    """``python -m zerver *args --port 0`` with JSON logs; yields the process, its bound
    port and the log lines it wrote until it serves: "server started", or with
    ``--workers`` "all workers ready" (one worker listening says nothing of the others).

    The process is killed if the block leaves it running; its pipes are closed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "zerver", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "ZER_VER_LOG_FORMAT": "json"},
        cwd=cwd,
    )
    workers = args[args.index("--workers") + 1] if "--workers" in args else "1"
    ready = "server started" if workers == "1" else "all workers ready"
    try:
        assert proc.stdout is not None
        lines: list[dict[str, Any]] = []
        port = 0
        for _ in range(50):  # bounded: start-up logs a handful of lines
            raw = proc.stdout.readline()
            if not raw:
                break
            lines.append(orjson.loads(raw))
            if lines[-1].get("event") == ready:
                port = int(lines[-1]["port"])
                break
        assert port, proc.stderr.read() if proc.stderr else "no start-up line"
        yield proc, port, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def demo_process(
    env: Mapping[str, str], cwd: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``zerver demo --port 0`` with JSON logs; yields the process and its bound port."""
    with zerver_process(["demo"], env, cwd) as (proc, port, _lines):
        yield proc, port
