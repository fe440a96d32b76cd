"""``zerver demo`` and ``zerver run`` on PostgreSQL as an operator meets them: real
processes, a real server, real sockets.

An unreachable server at start is one line on stderr naming the URL with its
password masked, and exit status 2; a reachable one serves the demo's blog
routes, seeded on first start, with any number of workers.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from demo_process import operator_env
from pg_server import PgServer, pg_server  # noqa: F401 - the session fixture

from zerver.demo import SEED_AUTHORS, SEED_POSTS


@contextmanager
def closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 where nothing listens (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def zerver_cmd(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zerver", *args],
        capture_output=True,
        text=True,
        env=operator_env(tmp_path, tmp_path / "state", **env),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed start, after checking the exit status."""
    assert "Traceback (most recent call last)" not in out.stderr, out.stderr
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["demo"], ["run", "zerver.demo:create_app"]])
def test_unreachable_server_at_start_is_one_line_and_exit_2(
    tmp_path: Path, command: list[str]
) -> None:
    with closed_port() as port:
        url = f"postgresql://blog:hunter2@127.0.0.1:{port}/blog"
        line = one_line(zerver_cmd(tmp_path, *command, "--port", "0", ZER_VER_DB_URL=url))
    assert line.startswith("zerver: ")
    assert f"cannot reach the database at postgresql://blog:***@127.0.0.1:{port}/blog" in line
    assert "hunter2" not in line
    assert not (tmp_path / "zerver.sqlite3").exists()


def test_wrong_password_at_start_is_one_line(
    tmp_path: Path,
    pg_server: PgServer,  # noqa: F811 - the fixture imported above
) -> None:
    url = pg_server.url("postgres", password="not-the-password")
    line = one_line(zerver_cmd(tmp_path, "demo", "--port", "0", ZER_VER_DB_URL=url))
    assert f"postgresql://zerver:***@127.0.0.1:{pg_server.port}/postgres" in line
    assert "password authentication failed" in line
    assert "not-the-password" not in line


def test_url_and_path_naming_two_databases_stop_start_up(tmp_path: Path) -> None:
    out = zerver_cmd(
        tmp_path,
        "demo",
        "--db",
        "blog.sqlite3",
        "--port",
        "0",
        ZER_VER_DB_URL="postgresql://blog:hunter2@127.0.0.1:5432/blog",
    )
    line = one_line(out)
    assert "ZER_VER_DB_URL='postgresql://blog:***@127.0.0.1:5432/blog'" in line
    assert "ZER_VER_DB_PATH='blog.sqlite3'" in line
    assert "hunter2" not in line


_PORT = re.compile(r'"port":(\d+)')


@contextmanager
def demo_workers(
    workers: str, env: dict[str, str], cwd: Path
) -> Iterator[tuple[Any, int, list[str]]]:
    """``zerver demo --workers N --port 0``; yields the process, its port and the log
    lines until it serves: "server started", or with several workers "all workers
    ready" (read as text: workers' lines may share one)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zerver", "demo", "--workers", workers, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "ZER_VER_LOG_FORMAT": "json"},
        cwd=cwd,
    )
    ready = "server started" if workers == "1" else "all workers ready"
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        port = 0
        for _ in range(50):  # bounded: start-up logs a handful of lines
            raw = proc.stdout.readline().decode(errors="replace")
            if not raw:
                break
            lines.append(raw)
            if f'"event":"{ready}"' in raw and (found := _PORT.search(raw)):
                port = int(found.group(1))
                break
        assert port, proc.stderr.read() if proc.stderr else "no start-up line"
        yield proc, port, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_demo_serves_its_blog_on_postgresql(
    tmp_path: Path,
    pg_server: PgServer,  # noqa: F811 - the fixture imported above
    workers: str,
) -> None:
    url = pg_server.new_schema()
    env = operator_env(tmp_path, tmp_path / "state", ZER_VER_DB_URL=url)
    with (
        demo_workers(workers, env, tmp_path) as (proc, port, lines),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        r = client.get("/blogs/posts/1")
        assert r.status_code == 200
        assert r.json() == {"post": SEED_POSTS["1"], "author": SEED_AUTHORS["ada"]}
        comments = client.get("/blogs/posts/1/comments")
        assert [c["id"] for c in comments.json()["comments"]] == ["c1", "c2"]
        created = client.post(
            "/blogs/posts", json={"title": "On PostgreSQL", "body": "Text", "author_id": "alan"}
        )
        assert created.status_code == 201
        location = created.headers["location"]
        # Read back on new connections: any worker sees what another wrote.
        for _ in range(6):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as fresh:
                got = fresh.get(location)
            assert got.status_code == 200
            assert got.json()["post"]["title"] == "On PostgreSQL"
        assert client.get("/blogs/posts/nope").status_code == 404
        assert proc.poll() is None
    for line in lines:
        assert pg_server.password not in repr(line)
    assert not (tmp_path / "zerver.sqlite3").exists()
