"""Benchmark: what the tracez pages cost the request path.

Demo-like traffic (``GET /blogs/posts/{id}`` with a database get and an
optional cache get joined into a continuation, ``GET /healthz``, and a 404),
dispatched in-process through routing, the executor and the job system with
zero-cost fake interpreters and traced to an in-memory sink, by two apps that
differ only in ``ZER_VER_ZPAGES``. Two measures:

* wall clock (default): rounds alternate on and off so drift (CPU frequency,
  other processes) hits both alike; the figure is the per-round ratio on/off,
  with its median and spread. On a shared machine the spread is wide;
* ``--instructions``: one process under ``valgrind --tool=callgrind`` runs both
  apps on a virtual clock (advanced 40 µs a request, about what one takes at
  native speed, so tracez keeps samples as often as it would: one per bucket
  per 10 ms), warms them up and freezes the heap start-up made (the
  collector's full passes then walk only what the requests leave); then rounds
  of ``n`` requests alternate the settings, for the mix above and for the blog
  page alone, each round between two ``callgrind_control --dump`` calls (what
  a dump itself costs is measured by empty rounds and taken off). Printed:
  instructions per request by setting (median, min, max over rounds) and the
  difference on - off per round. Instructions do not move with the machine's
  load; what still moves them is when the collector runs, hence the rounds.
  Slow (about ten minutes for ``--n 300 --rounds 6``); needs valgrind.

The cost of answering the summary page after the run is shown too (it folds
what the requests appended).

Run: ``python loadtest/bench_tracez.py [--n 20000] [--rounds 9] [--instructions]``
(with ``--instructions``, ``--n 300 --rounds 6`` is plenty).
"""

from __future__ import annotations

import argparse
import gc
import os
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
    Clock,
    Context,
    DbGet,
    Done,
    InMemorySpanSink,
    Join,
    Need,
    Request,
    Response,
    Slot,
    VirtualClock,
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


def _app(zpages: bool, clock: Clock | None = None) -> App:
    # A count window for the route p95 (not the default 60 s): the promoter's work per
    # request then does not depend on how fast the requests go (under callgrind, slowly).
    env = {
        "ZER_VER_ZPAGES": "on" if zpages else "off",
        "ZER_VER_METRICS_VIEW_ROUTE_P95_WINDOW": "1000",
    }
    app = App("bench", settings=load_settings(env), clock=clock)
    fake = FakeInterpreter(app.clock)
    fake.on("db.get blog_post", result={"title": "t"}, parks=[("io_wait", 0.0, "sqlite")])
    fake.on("cache.get author_profile", result={"name": "a"}, note={"cache.hit": True})
    app.interpreter("db", fake)
    app.interpreter("cache", fake)
    app.get("/blogs/posts/{id}", load)
    app.get("/healthz", healthz)
    app.trace_to(InMemorySpanSink(maxlen=1024))
    return app


async def _round(app: App, fake: FakeInterpreter, n: int) -> tuple[float, float]:
    """µs per request over ``n`` requests, and the 99th percentile of their latencies."""
    requests = [
        Request.from_target("GET", TARGETS[i % len(TARGETS)], headers=HEADERS, client=CLIENT)
        for i in range(n)
    ]
    dispatch = app.dispatch
    clock = time.perf_counter
    took = [0.0] * n
    t0 = clock()
    for i, req in enumerate(requests):
        t = clock()
        await dispatch(req)
        took[i] = clock() - t
        if i % 1000 == 0:
            fake.performed.clear()
    per_request = (clock() - t0) / n * 1e6
    took.sort()
    return per_request, took[int(0.99 * (n - 1))] * 1e6


async def run(n: int, rounds: int) -> dict[str, Any]:
    apps = {False: _app(False), True: _app(True)}
    fakes = {k: a.interpreters["db"] for k, a in apps.items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    p99s: dict[bool, list[float]] = {False: [], True: []}
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
                per_request, p99 = await _round(apps[on], fake, n)
                times[on].append(per_request)
                p99s[on].append(p99)
        page = Request.from_target("GET", "/debug/tracez", headers=HEADERS, client=CLIENT)
        t0 = time.perf_counter()
        resp = await apps[True].dispatch(page)
        page_ms = (time.perf_counter() - t0) * 1e3
        assert resp.status == 200
    ratios = [on / off for on, off in zip(times[True], times[False], strict=True)]
    return {
        "off": times[False],
        "on": times[True],
        "p99": p99s,
        "ratios": ratios,
        "page_ms": page_ms,
    }


#: Traffic for the instruction counts: the mix above, or the blog page alone.
TRAFFIC = {"mix": TARGETS, "blog": ["/blogs/posts/1", "/blogs/posts/2", "/blogs/posts/3"]}
#: Virtual time per request in the instruction counts: what a request takes at native
#: speed, so tracez keeps samples as often as it would (one per bucket per 10 ms).
_STEP_NS = 40_000


def _dump(label: str) -> None:
    """Ask callgrind to write the instructions counted since the last dump."""
    subprocess.run(
        ["callgrind_control", "--dump=" + label, str(os.getpid())],
        check=True,
        capture_output=True,
    )


async def _counted(n: int, rounds: int) -> None:
    """Under callgrind: both apps on a virtual clock, warmed up; the heap that start-up
    made frozen, so the collector's full passes do not walk it; then rounds alternate
    the settings (and the traffic), each between two dumps, and empty rounds measure
    what the dumps themselves cost."""
    apps = {on: _app(on, VirtualClock()) for on in (False, True)}
    async with apps[False].lifespan(), apps[True].lifespan():
        for app in apps.values():
            for targets in TRAFFIC.values():
                await _virtual_round(app, targets, 300)
        gc.collect()
        gc.freeze()
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for traffic, targets in TRAFFIC.items():
                for on in order:
                    _dump("start")
                    await _virtual_round(apps[on], targets, n)
                    _dump(f"{'on' if on else 'off'} {traffic}")
            _dump("start")
            _dump("empty")


async def _virtual_round(app: App, targets: list[str], n: int) -> None:
    clock = app.clock
    assert isinstance(clock, VirtualClock)
    fake = app.interpreters["db"]
    assert isinstance(fake, FakeInterpreter)
    dispatch = app.dispatch
    for i in range(n):
        await dispatch(
            Request.from_target("GET", targets[i % len(targets)], headers=HEADERS, client=CLIENT)
        )
        clock.advance(_STEP_NS)
    fake.performed.clear()


def instructions(n: int, rounds: int) -> dict[str, list[float]]:
    """Instructions per request, per round, by ``"<on|off> <traffic>"``: one process
    under callgrind, rounds alternated, what a dump costs taken off each round."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                sys.executable,
                __file__,
                "--child",
                "--n",
                str(n),
                "--rounds",
                str(rounds),
            ],
            check=True,
            capture_output=True,
            timeout=3600,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        counts: dict[str, list[int]] = {}
        for path in Path(tmp).glob("cg.out.*"):
            text = path.read_text(errors="replace")
            label = re.search(
                r"^desc: Trigger: Client Request: (.*)$|^desc: Trigger: (.*)$", text, re.M
            )
            total = re.search(r"^totals:\s+(\d+)", text, re.M)
            if label is None or total is None:
                continue
            name = (label.group(1) or label.group(2)).removeprefix("dump ")
            counts.setdefault(name, []).append(int(total.group(1)))
    if "empty" not in counts:
        raise RuntimeError(f"callgrind wrote no dumps: {sorted(counts)}")
    overhead = statistics.median(counts["empty"])
    return {
        key: [(c - overhead) / n for c in values]
        for key, values in sorted(counts.items())
        if key not in ("start", "empty")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per setting (alternated)")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under callgrind"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        anyio.run(_counted, args.n, args.rounds)
        return
    if args.instructions:
        counts = instructions(args.n, args.rounds)
        for traffic in TRAFFIC:
            off, on = counts[f"off {traffic}"], counts[f"on {traffic}"]
            for key, xs in (("off", off), ("on", on)):
                print(
                    f"{traffic:4} zpages {key:3}: median {statistics.median(xs):9,.0f} "
                    f"instructions/request (min {min(xs):,.0f}, max {max(xs):,.0f}; "
                    f"{len(xs)} rounds of {args.n})"
                )
            extra = [b - a for a, b in zip(off, on, strict=True)]
            print(
                f"{traffic:4} on - off: median {statistics.median(extra):+,.0f} "
                f"({statistics.median(extra) / statistics.median(off):+.2%}; "
                f"min {min(extra):+,.0f}, max {max(extra):+,.0f} per round)"
            )
        return
    res = anyio.run(run, args.n, args.rounds)
    for key, is_on in (("off", False), ("on", True)):
        xs = res[key]
        med = statistics.median(xs)
        print(
            f"zpages {key:3}: median {med:7.2f} µs/request, {1e6 / med:,.0f} requests/s "
            f"(min {min(xs):.2f}, max {max(xs):.2f}, {len(xs)} rounds of {args.n}); "
            f"p99 {statistics.median(res['p99'][is_on]):.1f} µs (median over rounds)"
        )
    r = res["ratios"]
    print(
        f"ratio on/off: median {statistics.median(r):.3f} "
        f"(min {min(r):.3f}, max {max(r):.3f}; 1.000 = no difference)"
    )
    print(f"summary page after the run: {res['page_ms']:.2f} ms (folds what was appended)")


if __name__ == "__main__":
    main()
