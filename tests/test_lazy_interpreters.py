"""The default interpreters open on first use: an app without database effects touches no file."""

from __future__ import annotations

import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from demo_process import operator_env, zerver_process

from zerver import (
    App,
    Context,
    DbGet,
    DbPut,
    Done,
    Effect,
    JobContext,
    Mode,
    Need,
    Response,
    Slot,
    SqliteInterpreter,
    load_settings,
    step,
)
from zerver.testing import AppClient

pytestmark = pytest.mark.anyio

DEFAULT_DB = "zerver.sqlite3"  # ZER_VER_DB_PATH's default, relative to the working directory

NOTE = Slot[Any]("note")
OTHER = Slot[Any]("other")


@step
def hello(ctx: Context) -> Done:
    return Done(Response.json({"hello": "world"}))


@step(reads=[NOTE])
def show(ctx: Context) -> Done:
    return Done(Response.json({"note": ctx.optional(NOTE), "other": ctx.optional(OTHER)}))


@step(writes=[NOTE, OTHER])
def load_two(ctx: Context) -> Need:
    # Two effects at once on a pool nobody opened yet: it opens once, both succeed.
    return Need(
        [DbGet(table="note", key="a", slot=NOTE), DbGet(table="note", key="b", slot=OTHER)],
        mode=Mode.PARALLEL,
        then=show,
    )


@step
def save(ctx: Context) -> Need:
    return Need(DbPut(table="note", key="a", value={"text": "hi"}), then=hello)


def make_app() -> App:
    # Default settings: the database is zerver.sqlite3 in the working directory.
    app = App("lazy", settings=load_settings({}))
    app.get("/hello", hello)
    app.get("/notes", load_two)
    app.post("/notes", save)
    return app


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def test_an_app_without_db_effects_creates_no_database_file(in_tmp_cwd: Path) -> None:
    app = make_app()
    async with AppClient(app) as client:
        for _ in range(3):
            assert (await client.get("/hello")).status == 200
        assert list(in_tmp_cwd.iterdir()) == []
    assert list(in_tmp_cwd.iterdir()) == []


async def test_the_first_db_effect_opens_the_default_database(in_tmp_cwd: Path) -> None:
    app = make_app()
    async with AppClient(app) as client:
        assert (await client.get("/hello")).status == 200
        assert not (in_tmp_cwd / DEFAULT_DB).exists()
        first = await client.get("/notes")
        assert (first.status, orjson.loads(first.body)) == (200, {"note": None, "other": None})
        assert (in_tmp_cwd / DEFAULT_DB).exists()
        assert (await client.post("/notes")).status == 200
        assert orjson.loads((await client.get("/notes")).body) == {
            "note": {"text": "hi"},
            "other": None,
        }


async def test_the_default_database_reopens_when_the_app_starts_again(in_tmp_cwd: Path) -> None:
    app = make_app()
    async with AppClient(app) as client:
        assert (await client.post("/notes")).status == 200
    async with AppClient(app) as client:
        assert orjson.loads((await client.get("/notes")).body) == {
            "note": {"text": "hi"},
            "other": None,
        }


class Recording:
    """An interpreter that notes when it is started and closed."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def start(self) -> None:
        self.events.append("start")

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        raise AssertionError("no effect expected")

    async def aclose(self) -> None:
        self.events.append("close")


async def test_interpreters_an_app_registers_start_with_the_app(in_tmp_cwd: Path) -> None:
    events: list[str] = []
    app = make_app()
    app.interpreter("db", Recording(events))

    async def hook(app: App) -> None:
        events.append("hook")

    app.on_startup(hook)
    async with AppClient(app) as client:
        assert events == ["start", "hook"]
        assert (await client.get("/hello")).status == 200
    assert events == ["start", "hook", "close"]


async def test_a_database_registered_by_the_app_opens_at_start(in_tmp_cwd: Path) -> None:
    app = make_app()
    app.interpreter("db", SqliteInterpreter(in_tmp_cwd / "own.sqlite3"))
    async with AppClient(app):
        assert (in_tmp_cwd / "own.sqlite3").exists()
    assert not (in_tmp_cwd / DEFAULT_DB).exists()


# -- a real server process -------------------------------------------------------------

APP_MODULE = """
    from zerver import App, Done, Response, step

    @step
    def hello(ctx):
        return Done(Response.json({"hello": "world"}))

    app = App("lazy")
    app.get("/hello", hello)
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """``python -m zerver run lazy_app:app`` in an empty working directory, default settings."""
    modules, cwd = tmp_path / "modules", tmp_path / "cwd"
    modules.mkdir()
    cwd.mkdir()
    (modules / "lazy_app.py").write_text(textwrap.dedent(APP_MODULE).lstrip())
    env = operator_env(modules, tmp_path / "state")
    with zerver_process(["run", "lazy_app:app"], env, cwd) as (proc, port, _lines):
        yield proc, port, cwd


def test_a_served_app_without_db_effects_creates_no_database_file(
    served: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, cwd = served
    for _ in range(3):
        resp = httpx.get(f"http://127.0.0.1:{port}/hello", timeout=5)
        assert (resp.status_code, resp.json()) == (200, {"hello": "world"})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert list(cwd.iterdir()) == []
