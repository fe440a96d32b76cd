"""Benchmark: what recording costs for the demo's happy-path request.

Two figures:

1. *recording only* — the record-keeping of ``GET /blogs/posts/{id}`` on a
   cache hit as the runtime performs it: a request is dispatched through the
   real runtime (routing, executor, job system, zero-cost fake interpreters),
   and the record it left (request, route-match and step records, a need with
   two effect jobs and a continuation job, their lifecycle timestamps and park
   episode, two slot writes) is replayed field for field, from the records'
   declared schemas: the same objects, the same writes, a clock read per
   timestamp, without the runtime around it. A change to what the runtime
   records changes what is replayed;
2. *whole dispatch* — the same request dispatched in-process through routing,
   the executor and the job system with zero-cost fake interpreters, for scale.

Run: ``python loadtest/bench_recording.py [--n 200000]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import anyio

from zerver import (
    App,
    CacheGet,
    Context,
    DbGet,
    Done,
    Join,
    MonotonicClock,
    Need,
    Request,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver.testing import FakeInterpreter, RecordCapture
from zerver.trace import RequestRecord
from zerver.trace._records import RECORD_CLASSES

POST: Slot[Any] = Slot("post")
AUTHOR: Slot[Any] = Slot("author")
HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench")]


def _replayer(record: RequestRecord) -> Callable[[MonotonicClock], RequestRecord]:
    """A function that makes ``record`` again as the runtime made it: straight-line
    code generated from the record classes' ``SCHEMA`` (timestamps read the clock)."""
    consts: list[Any] = []
    lines = ["def replay(clock):", "    now = clock.now_ns"]
    names = iter(f"o{i}" for i in range(10_000))

    def const(value: Any) -> str:
        consts.append(value)
        at = f"K[{len(consts) - 1}]"
        if isinstance(value, dict | list):  # the runtime makes these afresh
            return f"{type(value).__name__}({at})"
        return at

    def emit(obj: Any) -> str:
        var = next(names)
        cls = type(obj)
        if cls is RequestRecord:
            lines.append(f"    {var} = RequestRecord(clock)")
        else:
            lines.append(f"    {var} = _new({cls.__name__})")
        for field, _ in cls.SCHEMA:
            value = getattr(obj, field)
            if field.endswith("_ts") and isinstance(value, int):
                expr = "now()"
            elif hasattr(value, "SCHEMA"):
                expr = emit(value)
            elif isinstance(value, list) and value and hasattr(value[0], "SCHEMA"):
                expr = "[" + ", ".join(emit(v) for v in value) + "]"
            elif field == "effect":
                expr = const(value)
            else:
                expr = const(value)
            lines.append(f"    {var}.{field} = {expr}")
        return var

    top = emit(record)
    lines.append(f"    return {top}")
    scope: dict[str, Any] = {"K": consts, "_new": object.__new__}
    scope.update((cls.__name__, cls) for cls in RECORD_CLASSES)
    exec("\n".join(lines), scope)
    replay: Callable[[MonotonicClock], RequestRecord] = scope["replay"]
    return replay


async def _happy_record() -> RequestRecord:
    """One happy-path request's record, as the runtime leaves it."""
    app = _app()
    cap = RecordCapture()
    app.subscribe(cap)
    async with app.lifespan():
        response = await app.dispatch(Request.from_target("GET", "/blogs/posts/1", headers=HEADERS))
    if response.status != 200:
        raise RuntimeError(f"the happy path answered {response.status}")
    return cap.last


def bench_recording(n: int) -> float:
    clock = MonotonicClock()
    replay = _replayer(anyio.run(_happy_record))
    for _ in range(1000):
        replay(clock)
    t0 = time.perf_counter()
    for _ in range(n):
        replay(clock)
    return (time.perf_counter() - t0) / n * 1e6


@step
def render(ctx: Context) -> Done:
    return Done(Response.json({"post": ctx.optional(POST), "author": ctx.optional(AUTHOR)}))


@step
def load(ctx: Context) -> Need:
    pid = ctx.params["id"]
    return Need(
        [
            DbGet(table="blog_post", key=pid, slot=POST),
            CacheGet(namespace="author_profile", key=pid, slot=AUTHOR, required=False),
        ],
        join=Join.ALL,
        then=render,
    )


def _app() -> App:
    app = App("bench", settings=load_settings({}))
    fake = FakeInterpreter(app.clock)
    fake.on("db.get blog_post", result={"title": "t"}, parks=[("io_wait", 0.0, "sqlite")])
    fake.on("cache.get author_profile", result={"name": "a"}, note={"cache.hit": True})
    app.interpreter("db", fake)
    app.interpreter("cache", fake)
    app.get("/blogs/posts/{id}", load)
    return app


async def bench_dispatch(n: int) -> float:
    app = _app()
    fake = app.interpreters["db"]
    assert isinstance(fake, FakeInterpreter)
    headers = HEADERS
    async with app.lifespan():
        for _ in range(1000):
            await app.dispatch(Request.from_target("GET", "/blogs/posts/1", headers=headers))
        fake.performed.clear()
        t0 = time.perf_counter()
        for i in range(n):
            await app.dispatch(Request.from_target("GET", "/blogs/posts/1", headers=headers))
            if i % 1000 == 0:
                fake.performed.clear()
        return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000)
    args = parser.parse_args()
    rec_us = min(bench_recording(args.n) for _ in range(3))
    disp_us = anyio.run(bench_dispatch, max(args.n // 10, 1000))
    print(f"recording only, happy path : {rec_us:7.2f} µs/request (budget 10 µs)")
    print(f"whole in-process dispatch  : {disp_us:7.2f} µs/request")


if __name__ == "__main__":
    main()
