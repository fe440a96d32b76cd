"""The trace pages in real ``zerver`` processes: on for the demo, off for ``zerver run``,
per worker with ``--workers``, and with the exporter process on."""

from __future__ import annotations

import os
import re
import socket
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from demo_process import operator_env, zerver_process


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
    env = operator_env(
        cwd / "modules", cwd / "state", ZER_VER_DB_PATH=str(cwd / "demo.sqlite3"), **extra
    )
    if "ZER_VER_ZPAGES" not in extra:
        env.pop("ZER_VER_ZPAGES", None)
    return env


def get(port: int, path: str) -> httpx.Response:
    # A fresh connection each time, so that with several workers any may answer.
    with httpx.Client(headers={"connection": "close"}) as c:
        return c.get(f"http://127.0.0.1:{port}{path}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_serves_the_pages_and_run_does_not_by_default(cwd: Path) -> None:
    with zerver_process(["demo"], env_for(cwd), cwd) as (_proc, port, _lines):
        assert get(port, "/blogs/posts/1").status_code == 200
        summary = get(port, "/debug/tracez/api/summary").json()
        assert summary["requests"] == 1
        assert "http.server: GET /blogs/posts/{id}" in {s["name"] for s in summary["spans"]}
    with zerver_process(["demo"], env_for(cwd, ZER_VER_ZPAGES="off"), cwd) as (_p, port, _l):
        assert get(port, "/debug/tracez").status_code == 404
    with zerver_process(["run", "plain:app"], env_for(cwd), cwd) as (_proc, port, _lines):
        assert get(port, "/debug/tracez").status_code == 404
    on = env_for(cwd, ZER_VER_ZPAGES="on", ZER_VER_ZPAGES_PATH="/_z")
    with zerver_process(["run", "plain:app"], on, cwd) as (_proc, port, _lines):
        assert get(port, "/_z/tracez").status_code == 200


def test_each_worker_answers_for_itself_and_says_so(cwd: Path) -> None:
    with zerver_process(["demo", "--workers", "2"], env_for(cwd), cwd) as (proc, port, _lines):
        pids: set[int] = set()
        for _ in range(6):
            data = get(port, "/debug/tracez/api/summary").json()
            pids.add(data["process"]["pid"])
            assert "--workers N" in data["process"]["note"]
            page = get(port, "/debug/tracez").text
            shown = re.search(r"Answered by process (\d+)\. Numbers are this process", page)
            assert shown is not None
            pids.add(int(shown.group(1)))
        # Workers answer, not the supervising process.
        assert proc.pid not in pids and all(p > 0 for p in pids)


def test_with_the_exporter_process_the_pipeline_page_says_what_this_process_sees(
    cwd: Path,
) -> None:
    env = env_for(
        cwd,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{closed_port()}/v1/traces",
        ZER_VER_EXPORT_PROCESS="on",
        ZER_VER_EXPORT_SPOOL_DIR=str(cwd / "spool"),
    )
    with zerver_process(["demo"], env, cwd) as (_proc, port, _lines):
        for _ in range(3):
            assert get(port, "/blogs/posts/2").status_code == 200
        summary = get(port, "/debug/tracez/api/summary").json()
        assert summary["requests"] == 3  # tracez keeps its records in the serving process
        pipeline: dict[str, Any] = get(port, "/debug/tracez/api/pipeline").json()
        (pipe,) = pipeline["pipelines"]
        assert pipe["where"] == "exporter process"
        assert "separate exporter process" in pipe["note"]
        assert pipe["records_submitted"] == 3
        page = get(port, "/debug/pipeline")
        assert page.status_code == 200 and "records_submitted" in page.text
        assert str(pipeline["process"]["pid"]) in page.text
        assert pipeline["process"]["pid"] != os.getpid()
