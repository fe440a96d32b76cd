"""Redis as a shared backend: settings, spans, credentials, and what happens when the
server goes away (the cache fails fast and recovers; a killed consumer's message is
redelivered to another and processed once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from redis_server import RedisServer, own_redis_server, redis_server  # noqa: F401 (fixtures)

from zerver import (
    App,
    CacheGet,
    CacheSet,
    ConfigError,
    Context,
    Done,
    EffectError,
    Need,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver._config import mask_url
from zerver.runtime._messaging_redis import RedisStreamsBroker
from zerver.runtime.interpreters import RedisCacheInterpreter
from zerver.runtime.interpreters._redis import RedisTarget
from zerver.testing import AppClient, InMemorySpanSink

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-pw"
AUTHOR: Slot[Any] = Slot("author")


@step(writes=[AUTHOR])
def load_author(ctx: Context) -> Need:
    return Need(CacheGet(namespace="author", key=ctx.params["id"], slot=AUTHOR), then=show)


@step(reads=[AUTHOR])
def show(ctx: Context) -> Done:
    return Done(Response.json({"author": ctx.require(AUTHOR)}))


@step
def store_author(ctx: Context) -> Need:
    value = {"name": "Ann", "id": ctx.params["id"]}
    return Need(CacheSet(namespace="author", key=ctx.params["id"], value=value), then=stored)


@step
def stored(ctx: Context) -> Done:
    return Done(Response.text("stored", 201))


def cache_app(url: str) -> tuple[App, InMemorySpanSink]:
    app = App("authors", settings=load_settings({"ZER_VER_CACHE_URL": url}))
    app.get("/authors/{id}", load_author)
    app.post("/authors/{id}", store_author)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    return app, sink


async def password_url(server: RedisServer) -> str:
    """A URL with a user and password the server accepts (an ACL user)."""
    import redis.asyncio

    admin = redis.asyncio.Redis.from_url(server.url)
    try:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "zerver", "on", f">{PASSWORD}", "~*", "&*", "+@all"
        )
    finally:
        await admin.aclose()
    return f"redis://zerver:{PASSWORD}@{server.host}:{server.port}/0"


def test_mask_url() -> None:
    assert mask_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert mask_url("redis://:pw@h/2") == "redis://:***@h/2"
    assert mask_url("redis://h:6379") == "redis://h:6379"
    assert mask_url("rediss://u:p%40ss@h:1") == "rediss://u:***@h:1"


@pytest.mark.parametrize(
    "url",
    [
        "http://u:pw-secret@h:1/0",
        "redis://u:pw-secret@h:1/zero",
        "redis://u:pw-secret@:1/0",
        "redis://u:pw-secret@h:99999/0",
        "pw-secret",
    ],
)
def test_a_bad_url_names_the_variable_and_masks_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        App("x", settings=load_settings({"ZER_VER_CACHE_URL": url}))
    assert str(info.value).startswith("ZER_VER_CACHE_URL=")
    assert "accepted: redis://" in str(info.value)
    if "@" in url:
        assert "pw-secret" not in str(info.value)
    with pytest.raises(ConfigError, match="ZER_VER_BROKER_URL="):
        App("x", settings=load_settings({"ZER_VER_BROKER_URL": url}))


def test_settings_choose_the_backends() -> None:
    app = App("x", settings=load_settings({}))
    assert type(app.interpreters["cache"]).__name__ == "CacheInterpreter"
    assert type(app.broker).__name__ == "MemoryBroker"
    app = App(
        "x",
        settings=load_settings(
            {
                "ZER_VER_CACHE_URL": "redis://127.0.0.1:1/3",
                "ZER_VER_BROKER_URL": "redis://127.0.0.1:1/4",
                "ZER_VER_BROKER_VISIBILITY_TIMEOUT_MS": "1500",
                "ZER_VER_CACHE_TTL_MS": "250",
            }
        ),
    )
    cache = app.interpreters["cache"]
    assert isinstance(cache, RedisCacheInterpreter)
    assert (cache.target.db, cache.default_ttl_ms) == (3, 250)
    assert isinstance(app.broker, RedisStreamsBroker)
    assert (app.broker.target.db, app.broker.visibility_timeout_ms) == (4, 1500)


async def test_unreachable_server_at_start_is_one_clear_error() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, _sink = cache_app(f"redis://u:{PASSWORD}@127.0.0.1:{port}/0")
    with anyio.fail_after(10), pytest.raises(EffectError) as info:
        async with app.lifespan():
            pass
    assert info.value.kind == "cache_unavailable"
    assert f"redis://u:***@127.0.0.1:{port}/0" in str(info.value)
    assert PASSWORD not in str(info.value)


async def test_cache_spans_say_redis_and_never_the_password(redis_server: RedisServer) -> None:  # noqa: F811
    app, sink = cache_app(await password_url(redis_server))
    key = uuid.uuid4().hex
    async with AppClient(app) as c:
        assert (await c.get(f"/authors/{key}")).body == b'{"author":null}'
        assert (await c.post(f"/authors/{key}")).status == 201
        assert (await c.get(f"/authors/{key}")).body == (
            b'{"author":{"name":"Ann","id":"' + key.encode() + b'"}}'
        )
    spans = [s for trace in sink.traces for s in trace if s.name.startswith("cache.")]
    assert [(s.name, s.attributes.get("cache.hit")) for s in spans] == [
        ("cache.get author", False),
        ("cache.set author", None),
        ("cache.get author", True),
    ]
    for s in spans:
        assert s.attributes["db.system.name"] == "redis"
        assert s.attributes["db.system"] == "redis"
        assert s.attributes["cache.system"] == "redis"
        assert s.attributes["server.address"] == "127.0.0.1"
        assert s.attributes["server.port"] == redis_server.port
    everything = repr([s for trace in sink.traces for s in trace])
    assert PASSWORD not in everything


async def test_server_lost_and_back_fails_fast_then_recovers(
    own_redis_server: RedisServer,  # noqa: F811
) -> None:
    """Stopped mid-load: every request is answered (200 before, 503 with error.type
    cache_unavailable after), none hangs; restarted: the same app serves from Redis again."""
    app, sink = cache_app(own_redis_server.url)
    statuses: list[int] = []
    after_stop: list[int] = []  # of requests begun once the server was gone
    stopping = anyio.Event()
    down = anyio.Event()

    async def loader(c: AppClient, worker: int) -> None:
        for i in range(40):  # bounded: 5 loaders x 40 requests
            was_down = down.is_set()
            status = (await c.get(f"/authors/{worker}-{i}")).status
            statuses.append(status)
            if was_down:
                after_stop.append(status)
            if len(statuses) == 50 and not stopping.is_set():
                stopping.set()
                await anyio.to_thread.run_sync(own_redis_server.stop)
                down.set()

    async with AppClient(app) as c:
        assert (await c.post("/authors/1")).status == 201
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for worker in range(5):
                    tg.start_soon(loader, c, worker)
            await anyio.to_thread.run_sync(own_redis_server.start)
            assert (await c.post("/authors/1")).status == 201  # the data went with the server
            after = [(await c.get("/authors/1")).status for _ in range(10)]
    assert len(statuses) == 200 and set(statuses) <= {200, 503}
    assert statuses[:50] == [200] * 50  # before the stop
    assert after_stop and set(after_stop) == {503}
    assert after == [200] * 10
    failed = [
        s
        for trace in sink.traces
        for s in trace
        if s.name == "cache.get author" and "error.type" in s.attributes
    ]
    assert len(failed) == statuses.count(503)
    assert {s.attributes["error.type"] for s in failed} <= {"cache_unavailable", "cache_timeout"}


async def test_broker_rides_out_a_lost_server(own_redis_server: RedisServer) -> None:  # noqa: F811
    broker = RedisStreamsBroker(own_redis_server.url, block_ms=50, timeout_ms=500)
    await broker.start()
    try:
        got: list[bytes] = []

        async def consume() -> None:
            msg = await broker.receive("jobs")
            got.append(msg.body)
            await broker.ack(msg)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await anyio.sleep(0.1)  # let it wait on the stream
                own_redis_server.stop()
                with pytest.raises(EffectError) as info:
                    await broker.publish("jobs", b"lost", {})
                assert info.value.kind in ("broker_unavailable", "broker_timeout")
                assert info.value.retryable
                own_redis_server.start()
                await broker.publish("jobs", b"after", {})
        assert got == [b"after"]
        assert await broker.backlog("jobs") == 0
    finally:
        await broker.aclose()


CONSUMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import anyio
    from zerver import App, Context, Done, Response, load_settings, step
    from zerver.runtime._messaging_redis import RedisStreamsBroker

    url, prefix, name, out = sys.argv[1:]
    broker = RedisStreamsBroker(
        url, key_prefix=prefix, consumer_name=name, visibility_timeout_ms=300, block_ms=50
    )
    app = App(name, settings=load_settings({}), broker=broker)

    @step
    def handle(ctx: Context) -> Done:
        msg = ctx.message
        Path(out, f"{name}.started").write_text(f"{msg.id} {msg.attempt}")
        if name == "doomed":
            time.sleep(3600)  # killed here, mid-message
        with open(Path(out, "processed"), "a") as f:
            f.write(f"{name} {msg.id} {msg.attempt}\\n")
        return Done(Response.text("ok"))

    app.consumer("jobs", handle)

    async def main() -> None:
        async with app.lifespan():
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


async def _wait_for(path: Path) -> str:
    with anyio.fail_after(20):
        while not path.exists():
            await anyio.sleep(0.02)
    return path.read_text()


async def test_a_killed_consumers_message_is_processed_once_by_another(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    broker = RedisStreamsBroker(redis_server.url, key_prefix=prefix)

    def spawn(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", CONSUMER, redis_server.url, prefix, name, str(tmp_path)],
            env={**os.environ, "ZER_VER_LOG_LEVEL": "error"},
        )

    doomed = spawn("doomed")
    survivor: subprocess.Popen[bytes] | None = None
    try:
        mid = await broker.publish("jobs", b'{"n": 1}', {})
        assert (await _wait_for(tmp_path / "doomed.started")) == f"{mid} 1"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
        survivor = spawn("survivor")
        assert (await _wait_for(tmp_path / "processed")).splitlines() == [f"survivor {mid} 2"]
        with anyio.fail_after(20):  # acknowledged: nothing left to redeliver
            while await broker.backlog("jobs"):
                await anyio.sleep(0.02)
        assert (tmp_path / "processed").read_text().splitlines() == [f"survivor {mid} 2"]
    finally:
        for proc in (doomed, survivor):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        await broker.aclose()


def test_demo_workers_share_the_redis_cache(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``zerver demo --workers 2`` on Redis: the author one worker cached is in Redis,
    where every worker reads it (a hit on every request after the first)."""
    import urllib.request

    import redis
    from demo_process import operator_env, zerver_process

    url = f"redis://{redis_server.host}:{redis_server.port}/5"
    raw = redis.Redis.from_url(url)
    raw.flushdb()
    env = operator_env(
        tmp_path,
        tmp_path / "state",
        ZER_VER_CACHE_URL=url,
        ZER_VER_BROKER_URL=url,
        ZER_VER_DB_PATH=str(tmp_path / "demo.sqlite3"),
    )
    try:
        with zerver_process(["demo", "--workers", "2"], env, tmp_path) as (_proc, port, _lines):
            bodies = []
            for _ in range(6):
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/blogs/posts/1", timeout=10
                ) as response:
                    assert response.status == 200
                    bodies.append(response.read())
            assert len(set(bodies)) == 1
            assert raw.exists("zerver:cache:author_profile:1") == 1
            assert raw.pttl("zerver:cache:author_profile:1") > 0
    finally:
        raw.flushdb()
        raw.close()


async def test_two_consumers_share_a_stream_and_the_counters_add_up(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Two apps (as two processes: each its own broker, connections and consumer name)
    consume one stream: every message is handled by one of them, once; failures are
    retried or dead-lettered; summed, received == processed + retried + dead-lettered."""
    from zerver import Fail, RetryPolicy

    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    handled: list[tuple[str, int, int]] = []

    def make(name: str) -> App:
        broker = RedisStreamsBroker(
            redis_server.url, key_prefix=prefix, consumer_name=name, block_ms=50
        )
        app = App(name, settings=load_settings({}), broker=broker)

        @step
        def handle(ctx: Context) -> Any:
            assert ctx.message is not None
            n = ctx.message.json()["n"]
            handled.append((name, n, ctx.message.attempt))
            if n % 5 == 0:
                return Fail(503, "always fails")
            if n % 3 == 0 and ctx.message.attempt == 1:
                return Fail(503, "fails once")
            return Done(Response.text("ok"))

        app.consumer("jobs", handle, max_attempts=2, retry=RetryPolicy(backoff_ms=1, jitter=0))
        return app

    apps = [make("first"), make("second")]
    publisher = RedisStreamsBroker(redis_server.url, key_prefix=prefix)
    try:
        async with apps[0].lifespan(), apps[1].lifespan():
            for n in range(1, 31):
                await publisher.publish("jobs", b'{"n": %d}' % n, {})
            with anyio.fail_after(20):
                while await publisher.backlog("jobs") or any(
                    c.stats.in_flight for a in apps for c in a.consumers
                ):
                    await anyio.sleep(0.01)
        stats = [c.stats for a in apps for c in a.consumers]
        received = sum(s.received for s in stats)
        processed = sum(s.processed for s in stats)
        retried = sum(s.retried for s in stats)
        dead = sum(s.dead_lettered for s in stats)
        assert received == processed + retried + dead
        # 30 messages: 6 always fail (n % 5 == 0: 2 attempts, then dead), 8 more fail once.
        assert (processed, retried, dead) == (24, 6 + 8, 6)
        first_attempts = sorted(n for _name, n, attempt in handled if attempt == 1)
        assert first_attempts == list(range(1, 31))  # each message handled once per attempt
        assert len(handled) == received
        dead_letters = await publisher.drain("jobs.dead")
        assert sorted(m.json()["n"] for m in dead_letters) == [5, 10, 15, 20, 25, 30]
    finally:
        await publisher.aclose()


async def test_a_server_that_stops_answering_times_the_effect_out(
    own_redis_server: RedisServer,  # noqa: F811
) -> None:
    """A paused server (``CLIENT PAUSE``): the effect fails at its own ``timeout_ms``,
    never hangs; once the server answers again, replies are not mixed up."""
    import redis.asyncio

    slot: Slot[Any] = Slot("value")

    @step(writes=[slot])
    def read(ctx: Context) -> Need:
        key = ctx.params["key"]
        return Need(CacheGet(namespace="n", key=key, slot=slot, timeout_ms=300), then=answer)

    @step(reads=[slot])
    def answer(ctx: Context) -> Done:
        return Done(Response.json({"value": ctx.require(slot)}))

    @step
    def write(ctx: Context) -> Need:
        key = ctx.params["key"]
        return Need(CacheSet(namespace="n", key=key, value=key), then=stored)

    app = App("paused", settings=load_settings({"ZER_VER_CACHE_URL": own_redis_server.url}))
    app.get("/v/{key}", read)
    app.post("/v/{key}", write)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    admin = redis.asyncio.Redis.from_url(own_redis_server.url)
    try:
        async with AppClient(app) as c:
            for key in ("a", "b"):
                assert (await c.post(f"/v/{key}")).status == 201
            await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # type: ignore[no-untyped-call]
            with anyio.fail_after(10):
                paused = await c.get("/v/a")
            await admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            with anyio.fail_after(10):
                answers = [(await c.get(f"/v/{key}")).body for key in ("b", "a", "b")]
    finally:
        await admin.aclose()
    assert paused.status == 504
    assert answers == [b'{"value":"b"}', b'{"value":"a"}', b'{"value":"b"}']
    timed_out = [
        s for trace in sink.traces for s in trace if s.attributes.get("error.type") == "timeout"
    ]
    assert [s.name for s in timed_out] == ["cache.get n"]


async def test_a_message_whose_consumers_keep_dying_is_dead_lettered(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Handed out more than ``max_deliveries`` times without an ack: moved to
    ``<topic>.dead`` unprocessed, with the reason."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"

    def broker(name: str) -> RedisStreamsBroker:
        return RedisStreamsBroker(
            redis_server.url,
            key_prefix=prefix,
            consumer_name=name,
            visibility_timeout_ms=40,
            block_ms=20,
            max_deliveries=2,
        )

    dying, survivor = broker("dying"), broker("survivor")
    try:
        mid = await dying.publish("jobs", b"poison", {"traceparent": "00-x"})
        first = await dying.receive("jobs")  # delivery 1: never acknowledged
        assert (first.id, first.attempt) == (mid, 1)
        with anyio.fail_after(10):
            second = await survivor.receive("jobs")  # delivery 2, claimed: attempt 2
        assert (second.id, second.attempt, survivor.claimed) == (mid, 2, 1)
        with anyio.fail_after(10):  # delivery 3 would pass max_deliveries
            while not dying.buried:
                with anyio.move_on_after(0.2):
                    await dying.receive("jobs")
        assert await dying.backlog("jobs") == 0
        (dead,) = await dying.drain("jobs.dead")
        assert (dead.id, dead.body, dead.headers["traceparent"]) == (mid, b"poison", "00-x")
        assert dead.headers["x-zerver-dead-reason"].startswith("abandoned by 2 consumers")
    finally:
        await dying.aclose()
        await survivor.aclose()


def test_a_missing_client_is_a_start_up_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"zerver\[redis\]") as info:
        RedisTarget.parse("redis://:secret@127.0.0.1:1/0", variable="ZER_VER_CACHE_URL")
    assert "secret" not in str(info.value)
