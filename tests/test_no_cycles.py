"""A finished request leaves no reference cycles behind: its records, jobs and Need
state are freed by reference counting, so the cyclic collector has nothing of
ours to find (its full collections used to stall the loop under load)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zerver import (
    App,
    CacheGet,
    Context,
    DbGet,
    Done,
    EffectError,
    Join,
    Mode,
    Need,
    Request,
    Response,
    Slot,
    VirtualClock,
    load_settings,
    step,
)
from zerver.demo import create_app
from zerver.testing import FakeInterpreter, FakeRule

pytestmark = pytest.mark.anyio

A: Slot[Any] = Slot("a")
B: Slot[Any] = Slot("b")


def _request(path: str) -> Request:
    return Request(
        method="GET",
        path=path,
        headers=[(b"host", b"localhost")],
        client=("127.0.0.1", 50000),
        server=("127.0.0.1", 8080),
    )


class _Garbage:
    """Objects the cyclic collector found unreachable (kept for counting)."""

    def __init__(self) -> None:
        self.by_type: Counter[str] = Counter()


def _collected() -> Iterator[_Garbage]:
    found = _Garbage()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        # Only zerver's own objects: whatever else the process drops meanwhile (the
        # test runner's) is not ours to judge.
        found.by_type.update(
            type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("zerver")
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


async def _garbage_after(app: App, path: str, n: int = 20) -> Counter[str]:
    request = _request(path)
    async with app.lifespan():
        for _ in range(5):  # warm: caches filled, workers started
            await app.dispatch(request)
        collector = _collected()
        found = next(collector)
        for _ in range(n):
            await app.dispatch(request)
        next(collector, None)
    return found.by_type


@pytest.mark.parametrize(
    "path", ["/blogs/posts/1", "/blogs/posts/2", "/blogs/posts/999", "/healthz"]
)
async def test_demo_requests_leave_no_cycles(tmp_path: Path, path: str) -> None:
    app = create_app(settings=load_settings({}, db_path=str(tmp_path / "blog.sqlite3")))
    assert await _garbage_after(app, path) == Counter()


@step(reads=[A, B])
def render(ctx: Context) -> Done:
    return Done(Response.json({"a": ctx.optional(A), "b": ctx.optional(B)}))


def _needing(mode: Mode, join: Join, fail_db: bool) -> App:
    clock = VirtualClock()
    app = App("cycles", settings=load_settings({}), clock=clock)
    db_rule = (
        FakeRule(error=EffectError("down", kind="down", status_hint=503))
        if fail_db
        else FakeRule(result="row")
    )
    app.interpreter("db", FakeInterpreter(clock, default=db_rule))
    app.interpreter("cache", FakeInterpreter(clock, default=FakeRule(result="hit")))

    @step(writes=[A, B])
    def load(ctx: Context) -> Need:
        return Need(
            [DbGet(table="t", key="k", slot=A), CacheGet(namespace="n", key="k", slot=B)],
            mode=mode,
            join=join,
            then=render,
        )

    app.get("/x", load)
    return app


@pytest.mark.parametrize("mode", [Mode.PARALLEL, Mode.SEQUENTIAL])
@pytest.mark.parametrize("join", [Join.ALL, Join.ANY])
@pytest.mark.parametrize("fail_db", [False, True], ids=["ok", "db-fails"])
async def test_needs_leave_no_cycles_whatever_the_join(
    mode: Mode, join: Join, fail_db: bool
) -> None:
    assert await _garbage_after(_needing(mode, join, fail_db), "/x") == Counter()
