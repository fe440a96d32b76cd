"""Benchmark: what the effect path costs, piece by piece, without sockets.

Each case runs ``n`` iterations on one event loop, after a warm-up:

- ``plain``: ``App.dispatch`` of a route whose one step answers (routing,
  records, the executor, the response): the floor every request pays;
- ``need``: the demo's shape with zero-cost fake interpreters: a step that
  needs two effects in parallel (join all) and a continuation that answers:
  the job system alone;
- ``sqlite``: one ``SqliteInterpreter.get`` (a pooled connection, the hop to its
  thread and back), no job around it;
- ``blog``: the demo's ``GET /blogs/posts/1`` through ``App.dispatch`` with the
  real SQLite file and in-process cache, 32 requests in flight as under load;
- ``blog-traced``: the same with what tracing adds to the request path when the
  exporter process builds the traces: each finished record packed and
  marshalled onto a buffer (the exporter process's side is not counted).

Wall times vary with the machine; instruction counts do not: with
``--instructions`` each case runs twice under ``valgrind --tool=callgrind``
(``n`` and ``5 n`` iterations) and the difference per iteration is printed,
the same figure whatever else the machine is doing. The SQLite and worker
threads are counted too.

With ``--latency 64`` it prints instead the percentiles of the blog dispatch's
latency with 64 requests in flight (use ``--n 9600``), with the garbage collector
set up as ``zerver run`` sets it up: a stall of the loop shows there and not in
the mean.

Run: ``python -m loadtest.bench_effects [--n 2000] [--only blog,need] [--instructions]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from zerver import (
    App,
    CacheGet,
    Context,
    DbGet,
    Decision,
    Done,
    MonotonicClock,
    Need,
    Request,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver._gc import tune_gc
from zerver.demo import create_app
from zerver.runtime.interpreters import SqliteInterpreter
from zerver.testing import FakeInterpreter, FakeRule
from zerver.trace._offload import handover_bytes
from zerver.trace._records import RequestRecord

CASES = ("plain", "need", "sqlite", "blog", "blog-traced")
POST: Slot[Any] = Slot("post")
AUTHOR: Slot[Any] = Slot("author")


@step(reads=[POST, AUTHOR])
def render(ctx: Context) -> Decision:
    return Done(Response.json({"post": ctx.optional(POST), "author": ctx.optional(AUTHOR)}))


@step(writes=[POST, AUTHOR])
def load(ctx: Context) -> Decision:
    return Need(
        [
            DbGet(table="blog_post", key=ctx.params["id"], slot=POST),
            CacheGet(namespace="author_profile", key=ctx.params["id"], slot=AUTHOR, required=False),
        ],
        then=render,
    )


@step
def plain(ctx: Context) -> Decision:
    return Done(Response.json({"id": ctx.params["id"]}))


def _request(path: str) -> Request:
    return Request(
        method="GET",
        path=path,
        headers=[(b"host", b"bench")],
        client=("127.0.0.1", 50000),
        server=("127.0.0.1", 8080),
    )


async def _dispatching(app: App, path: str, n: int, concurrency: int) -> float:
    """Seconds for ``n`` dispatches of ``path`` with ``concurrency`` in flight."""
    request = _request(path)
    async with app.lifespan():
        for _ in range(200):
            response = await app.dispatch(request)
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}")

        async def worker(k: int) -> None:
            for _ in range(k):
                await app.dispatch(request)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(worker, n // concurrency + (1 if i < n % concurrency else 0))
        return time.perf_counter() - started


def _fake_app(clock: MonotonicClock) -> App:
    app = App("bench", settings=load_settings({}), clock=clock)
    app.interpreter("db", FakeInterpreter(clock, default=FakeRule(result={"id": "1"})))
    app.interpreter("cache", FakeInterpreter(clock, default=FakeRule(result={"id": "ada"})))
    app.get("/need/{id}", load)
    app.get("/plain/{id}", plain)
    return app


async def case_plain(n: int, tmp: str) -> float:
    return await _dispatching(_fake_app(MonotonicClock()), "/plain/1", n, 1)


async def case_need(n: int, tmp: str) -> float:
    return await _dispatching(_fake_app(MonotonicClock()), "/need/1", n, 1)


async def case_sqlite(n: int, tmp: str) -> float:
    db = SqliteInterpreter(os.path.join(tmp, "bench.sqlite3"))
    await db.start()
    try:
        await db.put("t", "1", {"id": "1"})
        for _ in range(200):
            await db.get("t", "1")
        started = time.perf_counter()
        for _ in range(n):
            await db.get("t", "1")
        return time.perf_counter() - started
    finally:
        await db.aclose()


async def case_blog(n: int, tmp: str) -> float:
    app = create_app(settings=load_settings({}, db_path=os.path.join(tmp, "blog.sqlite3")))
    return await _dispatching(app, "/blogs/posts/1", n, 32)


class _Handover:
    """The request-path half of ``ProcessTraceSubscriber``: pack, marshal, append."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []

    def on_request_end(self, record: RequestRecord) -> None:
        pending = self.pending
        pending.append(handover_bytes(record))
        if len(pending) >= 64:
            pending.clear()  # the feeder thread's hand-over, not measured here


async def case_blog_traced(n: int, tmp: str) -> float:
    app = create_app(settings=load_settings({}, db_path=os.path.join(tmp, "blog.sqlite3")))
    app.subscribe(_Handover())
    return await _dispatching(app, "/blogs/posts/1", n, 32)


_RUN: dict[str, Callable[[int, str], Awaitable[float]]] = {
    "plain": case_plain,
    "need": case_need,
    "sqlite": case_sqlite,
    "blog": case_blog,
    "blog-traced": case_blog_traced,
}


def run_case(name: str, n: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-effects-") as tmp:
        return anyio.run(_RUN[name], n, tmp)


async def _latencies(tmp: str, n: int, concurrency: int) -> list[float]:
    """Milliseconds each of ``n`` blog dispatches took, ``concurrency`` in flight."""
    app = create_app(settings=load_settings({}, db_path=os.path.join(tmp, "blog.sqlite3")))
    request = _request("/blogs/posts/1")
    took: list[float] = []
    async with app.lifespan():
        for _ in range(200):
            await app.dispatch(request)
        # The collector set up as `zerver run` sets it up (docs/performance.md,
        # "The garbage collector under load").
        tune_gc(app.settings.gc_threshold)

        async def worker(k: int) -> None:
            for _ in range(k):
                started = time.perf_counter()
                await app.dispatch(request)
                took.append((time.perf_counter() - started) * 1000)

        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(worker, n // concurrency + (1 if i < n % concurrency else 0))
    return sorted(took)


def latency(n: int, concurrency: int) -> str:
    """The blog dispatch's latency distribution under ``concurrency`` requests in flight
    (the collector on, as in a server): a stall of the loop shows in the tail."""
    with tempfile.TemporaryDirectory(prefix="bench-effects-") as tmp:
        took = anyio.run(_latencies, tmp, n, concurrency)

    def q(p: float) -> float:
        return took[int(p * (len(took) - 1))]

    return (
        f"blog latency, {concurrency} in flight, {len(took)} requests: p50 {q(0.5):.1f} ms, "
        f"p90 {q(0.9):.1f} ms, p99 {q(0.99):.1f} ms, max {took[-1]:.1f} ms"
    )


def _instructions(name: str, n: int) -> int:
    """Instructions callgrind counts for one process running ``name`` ``n`` times."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            os.path.realpath(sys.executable),
            "-m",
            "loadtest.bench_effects",
            "--case-once",
            name,
            "--n",
            str(n),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    found = re.search(r"Collected : ([\d,]+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="iterations per case (2000)")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--repeat", type=int, default=3, help="wall-time runs, best kept (3)")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions with callgrind"
    )
    parser.add_argument(
        "--latency",
        type=int,
        metavar="IN_FLIGHT",
        help="instead: the blog dispatch's latency percentiles with this many in flight",
    )
    parser.add_argument("--case-once", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case_once:
        run_case(args.case_once, args.n)
        return
    if args.latency:
        print(latency(args.n, args.latency))
        return
    names = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}: choose from {', '.join(CASES)}")
    print(f"{'case':<8} {'µs/iteration (best of ' + str(args.repeat) + ')':>28}", end="")
    print(f" {'instructions/iteration':>24}" if args.instructions else "")
    for name in names:
        best = min(run_case(name, args.n) for _ in range(args.repeat)) / args.n * 1e6
        line = f"{name:<8} {best:>28.1f}"
        if args.instructions:
            small, big = _instructions(name, args.n), _instructions(name, 5 * args.n)
            line += f" {(big - small) / (4 * args.n):>24,.0f}"
        print(line)


if __name__ == "__main__":
    main()
