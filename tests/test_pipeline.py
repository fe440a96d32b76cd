"""The programming model end to end, in-process, with fake interpreters and a virtual clock."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from zerver import (
    App,
    CacheGet,
    Context,
    Continue,
    DbGet,
    Done,
    EffectError,
    Fail,
    Join,
    Mode,
    Need,
    Response,
    RetryPolicy,
    Slot,
    VirtualClock,
    load_settings,
    step,
)
from zerver.testing import AppClient, FakeInterpreter, RecordCapture

pytestmark = pytest.mark.anyio

POST: Slot[dict[str, Any]] = Slot("post")
AUTHOR: Slot[dict[str, Any]] = Slot("author")
SEEN: Slot[list[str]] = Slot("seen")


def make_app(**settings: Any) -> tuple[App, VirtualClock, FakeInterpreter, RecordCapture]:
    clock = VirtualClock()
    app = App("t", clock=clock, settings=load_settings({}, **settings))
    fake = FakeInterpreter(clock)
    app.interpreter("db", fake)
    app.interpreter("cache", fake)
    app.interpreter("http", fake)
    cap = RecordCapture()
    app.subscribe(cap)
    return app, clock, fake, cap


@step(reads=[POST, AUTHOR])
def render(ctx: Context) -> Done | Fail:
    post = ctx.optional(POST)
    if post is None:
        return Fail(404, "no such post", key=ctx.params["id"])
    return Done(Response.json({"post": post, "author": ctx.optional(AUTHOR)}))


@step(writes=[POST, AUTHOR])
def load(ctx: Context) -> Need:
    pid = ctx.params["id"]
    return Need(
        [
            DbGet(table="blog_post", key=pid, slot=POST),
            CacheGet(namespace="author_profile", key=pid, slot=AUTHOR, required=False),
        ],
        mode=Mode.PARALLEL,
        join=Join.ALL,
        then=render,
    )


async def test_need_then_continuation_renders() -> None:
    app, _clock, fake, cap = make_app()
    fake.on("db.get blog_post", result={"title": "hi"}, work_ms=2)
    fake.on("cache.get author_profile", result={"name": "ann"}, note={"cache.hit": True})
    app.get("/blogs/posts/{id}", load)
    async with AppClient(app) as c:
        r = await c.get("/blogs/posts/7")
    assert r.status == 200
    assert orjson.loads(r.body) == {"post": {"title": "hi"}, "author": {"name": "ann"}}
    rec = cap.last
    assert rec.route == "/blogs/posts/{id}"
    assert rec.params == {"id": "7"}
    assert [s.name for s in rec.steps] == ["route_match", "load", "render"]
    assert [s.layer for s in rec.steps] == ["route_match", "route", "continuation"]
    assert rec.steps[1].decision == "Need" and rec.steps[1].resume == "render"
    assert rec.steps[2].decision == "Done" and rec.steps[2].render_phase == "json_encode"
    assert [j.kind for j in rec.jobs] == ["effect", "effect", "continuation"]
    assert [j.name for j in rec.jobs] == [
        "db.get blog_post",
        "cache.get author_profile",
        "step.render.resume",
    ]
    assert all(j.outcome == "complete" for j in rec.jobs)
    assert rec.jobs[1].result_meta == {"cache.hit": True}
    need = rec.steps[1].need
    assert need is not None and need.n_effects == 2 and need.completed == 2
    assert {w.slot for w in rec.slot_writes} == {"post", "author"}
    assert rec.status == 200 and rec.response_body_size == len(r.body)


async def test_fail_maps_to_json_error_body() -> None:
    app, _clock, fake, cap = make_app()
    fake.on("db.get blog_post", result=None)
    fake.on("cache.get author_profile", result=None)
    app.get("/blogs/posts/{id}", load)
    async with AppClient(app) as c:
        r = await c.get("/blogs/posts/404")
    assert r.status == 404
    assert orjson.loads(r.body) == {"error": "no such post", "key": "404"}
    assert not cap.last.system_fault


async def test_routing_404_405_head() -> None:
    app, _clock, _fake, cap = make_app()

    @step
    def hello(ctx: Context) -> Done:
        return Done(Response.text("hello"))

    app.get("/hello", hello)
    app.post("/items", hello)
    async with AppClient(app) as c:
        r404 = await c.get("/nope")
        r405 = await c.request("DELETE", "/items")
        head = await c.request("HEAD", "/hello")
    assert r404.status == 404
    assert r405.status == 405 and r405.header("allow") == "POST"
    assert head.status == 200
    assert cap.records[0].route is None
    assert cap.records[1].route == "/items"
    assert cap.records[2].response_body_size == 0  # HEAD sends no body


async def test_before_steps_run_in_order_and_can_answer() -> None:
    app, _clock, _fake, cap = make_app()

    @step(writes=[SEEN])
    def global_before(ctx: Context) -> Any:
        ctx.put(SEEN, ["global"])
        return Continue

    @step(reads=[SEEN], writes=[SEEN])
    def route_before(ctx: Context) -> Any:
        if ctx.request.header("x-deny"):
            return Fail(403, "denied")
        ctx.put(SEEN, [*ctx.require(SEEN), "route"])
        return Continue

    @step(reads=[SEEN])
    def main(ctx: Context) -> Done:
        return Done(Response.json(ctx.require(SEEN)))

    app.before(global_before)
    app.get("/x", main, before=[route_before])
    async with AppClient(app) as c:
        ok = await c.get("/x")
        denied = await c.get("/x", headers=[("x-deny", "1")])
    assert orjson.loads(ok.body) == ["global", "route"]
    assert denied.status == 403
    layers = [(s.name, s.layer, s.sequence) for s in cap.records[0].steps]
    assert layers == [
        ("route_match", "route_match", 0),
        ("global_before", "before", 1),
        ("route_before", "before", 2),
        ("main", "route", 3),
    ]


async def test_raising_step_gives_500_with_error_id() -> None:
    app, _clock, _fake, cap = make_app()

    @step
    def boom(ctx: Context) -> Done:
        raise RuntimeError("kaput")

    app.get("/boom", boom)
    async with AppClient(app) as c:
        r = await c.get("/boom")
    body = orjson.loads(r.body)
    assert r.status == 500 and len(body["error_id"]) == 16
    rec = cap.last
    assert (
        rec.system_fault and rec.error_type == "RuntimeError" and rec.error_id == body["error_id"]
    )
    assert rec.steps[1].error_type == "RuntimeError"


async def test_missing_required_slot_is_a_clear_fault() -> None:
    app, _clock, _fake, cap = make_app()

    @step(reads=[POST])
    def needs_post(ctx: Context) -> Done:
        return Done(Response.json(ctx.require(POST)))

    app.get("/p", needs_post)
    async with AppClient(app) as c:
        r = await c.get("/p")
    assert r.status == 500
    assert cap.last.error_type == "MissingSlotError"
    assert "required slot 'post' has no value in step 'needs_post'" in (
        cap.last.error_message or ""
    )


async def test_step_returning_garbage_and_pipeline_without_answer() -> None:
    app, _clock, _fake, cap = make_app()

    @step
    def garbage(ctx: Context) -> Any:
        return 42

    @step
    def cont(ctx: Context) -> Any:
        return Continue

    app.get("/g", garbage)
    app.get("/c", cont)
    async with AppClient(app) as c:
        assert (await c.get("/g")).status == 500
        assert cap.last.error_type == "InvalidDecision"
        assert (await c.get("/c")).status == 500
        assert cap.last.error_type == "NoResponse"


async def test_need_without_then_continues_with_next_step() -> None:
    app, _clock, fake, _cap = make_app()
    fake.on("db.get blog_post", result={"t": 1})

    @step(writes=[POST])
    def fetch(ctx: Context) -> Need:
        return Need(DbGet(table="blog_post", key="1", slot=POST))

    app.get("/n", fetch, render.__class__(render.fn, name="render2", reads=[POST]))
    async with AppClient(app) as c:
        r = await c.get("/n")
    assert r.status == 200


async def test_need_depth_is_bounded() -> None:
    app, _clock, fake, cap = make_app(max_need_depth=3)
    fake.on("db.get t", result=1)

    @step
    def again(ctx: Context) -> Need:
        return Need(DbGet(table="t", key="k"), then=again)

    app.get("/loop", again)
    async with AppClient(app) as c:
        r = await c.get("/loop")
    assert r.status == 500
    assert cap.last.error_type == "NeedDepthExceeded"
    assert sum(1 for s in cap.last.steps if s.layer == "continuation") == 3


async def test_required_failure_fails_request_with_status_hint() -> None:
    app, _clock, fake, cap = make_app()
    fake.on("db.get blog_post", error=EffectError("disk on fire", kind="db_error"))
    fake.on("cache.get author_profile", result=None)
    app.get("/blogs/posts/{id}", load)
    async with AppClient(app) as c:
        r = await c.get("/blogs/posts/1")
    assert r.status == 500
    assert orjson.loads(r.body) == {
        "error": "required effect failed: db_error",
        "key": "db.get blog_post",
    }
    rec = cap.last
    assert rec.jobs[0].outcome == "fail" and rec.jobs[0].error_type == "db_error"
    assert not rec.system_fault  # an effect failure is not a runtime fault


async def test_optional_failure_does_not_fail_request() -> None:
    app, _clock, fake, cap = make_app()
    fake.on("db.get blog_post", result={"t": 1})
    fake.on("cache.get author_profile", error=EffectError("cache down"))
    app.get("/blogs/posts/{id}", load)
    async with AppClient(app) as c:
        r = await c.get("/blogs/posts/1")
    assert r.status == 200
    assert orjson.loads(r.body)["author"] is None
    assert cap.last.jobs[1].outcome == "fail"


async def test_retries_are_real_and_recorded() -> None:
    app, _clock, fake, cap = make_app()
    fake.on(
        "db.get t",
        error=EffectError("busy", kind="db_busy", retryable=True),
        fail_times=2,
        result="ok",
    )

    @step
    def ask(ctx: Context) -> Need:
        policy = RetryPolicy(max_attempts=3, backoff_ms=10, jitter=0)
        return Need(DbGet(table="t", key="k", slot=POST, retry=policy), then=show)

    @step(reads=[POST])
    def show(ctx: Context) -> Done:
        return Done(Response.json(ctx.require(POST)))

    app.get("/r", ask)
    async with AppClient(app) as c:
        r = await c.get("/r")
    assert r.status == 200 and r.body == b'"ok"'
    job = cap.last.jobs[0]
    assert job.attempts == 3
    assert [(x.attempt, x.reason, x.backoff_ms) for x in job.retries] == [
        (1, "db_busy", 10.0),
        (2, "db_busy", 20.0),
    ]
    timers = [p for p in job.park_episodes if p.cause == "timer"]
    assert [(p.resume_ts or 0) - p.park_ts for p in timers] == [10_000_000, 20_000_000]


async def test_non_retryable_error_is_not_retried() -> None:
    app, _clock, fake, cap = make_app()
    fake.on("db.get t", error=EffectError("bad", kind="db_error", retryable=False))

    @step
    def ask(ctx: Context) -> Need:
        return Need(DbGet(table="t", key="k", retry=RetryPolicy(max_attempts=5)))

    app.get("/r", ask)
    async with AppClient(app) as c:
        r = await c.get("/r")
    assert r.status == 500
    assert cap.last.jobs[0].attempts == 1
