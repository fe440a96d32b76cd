"""Benchmark: what the tracez pages cost the request path.

Demo-like traffic (``GET /blogs/posts/{id}`` with a database get and an
optional cache get joined into a continuation, ``GET /healthz``, and a 404),
dispatched in-process through routing, the executor and the job system with
zero-cost fake interpreters and traced to an in-memory sink, by two apps that
differ only in ``ZER_VER_ZPAGES``. Two measures:

* wall clock (default): rounds alternate on and off so drift (CPU frequency,
  other processes) hits both alike; the figure is the per-round ratio on/off,
  with its median and spread. On a shared machine the spread is wide;
* ``--instructions``: each setting runs in processes of its own under
  ``valgrind --tool=callgrind``, once with ``n`` and once with ``2 n`` requests;
  the difference divided by ``n`` is the instructions per request, start-up and
  warm-up cancelling out. Instructions do not move with the machine's load.
  Slow (several minutes); needs valgrind.

The cost of answering the summary page after the run is shown too (it folds
what the requests appended).

Run: ``python loadtest/bench_tracez.py [--n 20000] [--rounds 9] [--instructions]``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from zerver import (
    App,
    CacheGet,
    Context,
    DbGet,
    Done,
    InMemorySpanSink,
    Join,
    Need,
    Request,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver.testing import FakeInterpreter

POST: Slot[Any] = Slot("post")
AUTHOR: Slot[Any] = Slot("author")
HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench")]
CLIENT = ("127.0.0.1", 50000)
# Mostly the blog page, as the demo's load generator sends.
TARGETS = ["/blogs/posts/1", "/blogs/posts/2", "/blogs/posts/3", "/healthz"] * 4 + ["/nope"]


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


@step
def healthz(ctx: Context) -> Done:
    return Done(Response.json({"ok": True}))


#: tracez's sample interval (``--sample-interval-ms``); None: its default (10 ms).
_INTERVAL_NS: list[int] = []


def _app(zpages: bool) -> App:
    # A count window for the route p95 (not the default 60 s): the promoter's work per
    # request then does not depend on how fast the requests go (under callgrind, slowly).
    env = {
        "ZER_VER_ZPAGES": "on" if zpages else "off",
        "ZER_VER_METRICS_VIEW_ROUTE_P95_WINDOW": "1000",
    }
    app = App("bench", settings=load_settings(env))
    fake = FakeInterpreter(app.clock)
    fake.on("db.get blog_post", result={"title": "t"}, parks=[("io_wait", 0.0, "sqlite")])
    fake.on("cache.get author_profile", result={"name": "a"}, note={"cache.hit": True})
    app.interpreter("db", fake)
    app.interpreter("cache", fake)
    app.get("/blogs/posts/{id}", load)
    app.get("/healthz", healthz)
    app.trace_to(InMemorySpanSink(maxlen=1024))
    if _INTERVAL_NS and app._zpages is not None:
        app._zpages.aggregator.sample_interval_ns = _INTERVAL_NS[0]
    return app


async def _round(app: App, fake: FakeInterpreter, n: int) -> float:
    """µs per request over ``n`` requests."""
    requests = [
        Request.from_target("GET", TARGETS[i % len(TARGETS)], headers=HEADERS, client=CLIENT)
        for i in range(n)
    ]
    dispatch = app.dispatch
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        await dispatch(req)
        if i % 1000 == 0:
            fake.performed.clear()
    return (time.perf_counter() - t0) / n * 1e6


async def run(n: int, rounds: int) -> dict[str, Any]:
    apps = {False: _app(False), True: _app(True)}
    fakes = {k: a.interpreters["db"] for k, a in apps.items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    async with apps[False].lifespan(), apps[True].lifespan():
        for on in (False, True):  # warm-up
            fake = fakes[on]
            assert isinstance(fake, FakeInterpreter)
            await _round(apps[on], fake, min(n, 2000))
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for on in order:
                fake = fakes[on]
                assert isinstance(fake, FakeInterpreter)
                times[on].append(await _round(apps[on], fake, n))
        page = Request.from_target("GET", "/debug/tracez", headers=HEADERS, client=CLIENT)
        t0 = time.perf_counter()
        resp = await apps[True].dispatch(page)
        page_ms = (time.perf_counter() - t0) * 1e3
        assert resp.status == 200
    ratios = [on / off for on, off in zip(times[True], times[False], strict=True)]
    return {"off": times[False], "on": times[True], "ratios": ratios, "page_ms": page_ms}


async def _counted(on: bool, n: int) -> None:
    """In a process under callgrind: warm up, then serve ``n`` requests."""
    app = _app(on)
    fake = app.interpreters["db"]
    assert isinstance(fake, FakeInterpreter)
    async with app.lifespan():
        await _round(app, fake, 2000)
        await _round(app, fake, n)


def _total_instructions(key: str, n: int) -> int:
    """Instructions of a whole child process (start-up, warm-up and ``n`` requests)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                sys.executable,
                __file__,
                "--child",
                key,
                "--n",
                str(n),
                *(["--sample-interval-ms", str(_INTERVAL_NS[0] / 1e6)] if _INTERVAL_NS else []),
            ],
            check=True,
            capture_output=True,
            timeout=3600,
        )
        text = (Path(tmp) / "cg.out").read_text(errors="replace")
    m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)", text, re.M)
    if m is None:
        raise RuntimeError("callgrind wrote no totals")
    return int(m.group(1))


def instructions(n: int) -> dict[str, float]:
    """Instructions per request with the pages off and on: each setting runs twice,
    with ``n`` and ``2 n`` measured requests, and the difference is divided by ``n``,
    so start-up and warm-up cancel out."""
    return {
        key: (_total_instructions(key, 2 * n) - _total_instructions(key, n)) / n
        for key in ("off", "on")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per setting (alternated)")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under callgrind"
    )
    parser.add_argument(
        "--sample-interval-ms",
        type=float,
        help="tracez's sample interval (default 10 ms); under callgrind, which runs some "
        "50-100 times slower, 1000 keeps samples as 10 ms does at native speed",
    )
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample_interval_ms is not None:
        _INTERVAL_NS.append(int(args.sample_interval_ms * 1e6))
    if args.child is not None:
        anyio.run(_counted, args.child == "on", args.n)
        return
    if args.instructions:
        counts = instructions(args.n)
        print(f"zpages off: {counts['off']:,.0f} instructions/request ({args.n} requests)")
        print(f"zpages on : {counts['on']:,.0f} instructions/request ({args.n} requests)")
        print(f"ratio on/off: {counts['on'] / counts['off']:.4f} (1.0000 = no difference)")
        return
    res = anyio.run(run, args.n, args.rounds)
    for key in ("off", "on"):
        xs = res[key]
        print(
            f"zpages {key:3}: median {statistics.median(xs):7.2f} µs/request "
            f"(min {min(xs):.2f}, max {max(xs):.2f}, {len(xs)} rounds of {args.n})"
        )
    r = res["ratios"]
    print(
        f"ratio on/off: median {statistics.median(r):.3f} "
        f"(min {min(r):.3f}, max {max(r):.3f}; 1.000 = no difference)"
    )
    print(f"summary page after the run: {res['page_ms']:.2f} ms (folds what was appended)")


if __name__ == "__main__":
    main()
