"""Benchmark: what recording costs for the demo's happy-path request.

Two figures:

1. *recording only* — the exact record-keeping the runtime performs for
   ``GET /blogs/posts/{id}`` on a cache hit (request record, route-match and
   step records, a need with two effect jobs and a continuation job, their
   lifecycle timestamps and park episodes, two slot writes, finish), replayed
   without the runtime around it;
2. *whole dispatch* — the same request dispatched in-process through routing,
   the executor and the job system with zero-cost fake interpreters, for scale.

Run: ``python loadtest/bench_recording.py [--n 200000]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio

from zerver import (
    App,
    CacheGet,
    Context,
    DbGet,
    Done,
    JobState,
    Join,
    MonotonicClock,
    Need,
    NeedRecord,
    ParkEpisode,
    Request,
    RequestRecord,
    Response,
    Slot,
    StepRecord,
    load_settings,
    step,
)
from zerver.testing import FakeInterpreter

POST: Slot[Any] = Slot("post")
AUTHOR: Slot[Any] = Slot("author")


def record_happy_path(clock: MonotonicClock, eff_a: Any, eff_b: Any) -> RequestRecord:
    now = clock.now_ns
    rec = RequestRecord(clock)
    rec.method = "GET"
    rec.path = "/blogs/posts/1"
    rec.client_address, rec.client_port = "127.0.0.1", 50000
    rec.server_address, rec.server_port = "127.0.0.1", 8080
    rec.host = "127.0.0.1:8080"
    rec.user_agent = "bench"
    rec.request_id = "0123456789abcdef"
    rm = StepRecord(
        index=0,
        name="route_match",
        layer="route_match",
        sequence=0,
        reads=(),
        writes=(),
        start_ts=now(),
    )
    rec.steps.append(rm)
    rm.end_ts = now()
    rm.decision = "Continue"
    rec.route = "/blogs/posts/{id}"
    rec.params = {"id": "1"}
    st = StepRecord(
        index=1,
        name="load_blog_post_page",
        layer="route",
        sequence=1,
        reads=(),
        writes=("post", "author"),
        start_ts=now(),
    )
    rec.steps.append(st)
    st.end_ts = now()
    st.decision = "Need"
    st.resume = "render_blog_post_page"
    need = NeedRecord(now(), 2, "parallel", "all", "render_blog_post_page")
    st.need = need
    for i, eff in enumerate((eff_a, eff_b)):
        j = JobState(
            index=i, kind="effect", name=eff.span_name, queue="effects", step_index=1, effect=eff
        )
        rec.jobs.append(j)
        need.jobs.append(i)
        j.enqueue_ts = now()
        j.depth_enqueue = i
    for i, j in enumerate(rec.jobs):
        j.take_ts = now()
        j.worker = i
        j.depth_take = 0
        j.start_ts = now()
        j.attempts = 1
        if i == 0:
            ep = ParkEpisode("io_wait", now(), "sqlite")
            j.park_episodes.append(ep)
            ep.resume_ts = now()
        else:
            j.result_meta = {"cache.hit": True}
        rec.slot_written("post" if i == 0 else "author", 120)
        j.end_ts = now()
        j.outcome = "complete"
        j.success = True
    need.join_ts = now()
    need.completed = 2
    cj = JobState(
        index=2,
        kind="continuation",
        name="step.render_blog_post_page.resume",
        queue="continuations",
        step_index=1,
    )
    rec.jobs.append(cj)
    cj.enqueue_ts = now()
    cj.take_ts = now()
    cj.worker = 0
    cj.start_ts = now()
    cs = StepRecord(
        index=2,
        name="render_blog_post_page",
        layer="continuation",
        sequence=1,
        reads=("post", "author"),
        writes=(),
        start_ts=now(),
        job_index=2,
    )
    rec.steps.append(cs)
    cj.cont_step_index = 2
    cs.end_ts = now()
    cs.decision = "Done"
    cs.render_phase = "json_encode"
    cs.render_size = 180
    cj.end_ts = now()
    cj.outcome = "complete"
    cj.success = True
    rec.finish(200, 180)
    return rec


def bench_recording(n: int) -> float:
    clock = MonotonicClock()
    a = DbGet(table="blog_post", key="1", slot=POST)
    b = CacheGet(namespace="author_profile", key="1", slot=AUTHOR, required=False)
    for _ in range(1000):
        record_happy_path(clock, a, b)
    t0 = time.perf_counter()
    for _ in range(n):
        record_happy_path(clock, a, b)
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


async def bench_dispatch(n: int) -> float:
    app = App("bench", settings=load_settings({}))
    fake = FakeInterpreter(app.clock)
    fake.on("db.get blog_post", result={"title": "t"})
    fake.on("cache.get author_profile", result={"name": "a"})
    app.interpreter("db", fake)
    app.interpreter("cache", fake)
    app.get("/blogs/posts/{id}", load)
    headers = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench")]
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
