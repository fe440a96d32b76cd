"""Publish → consume through each broker (the embedded one and Redis Streams):
spans, retries, dead letters, bounds."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, cast

import anyio
import orjson
import pytest
from redis_server import RedisServer, redis_server  # noqa: F401 (a fixture)
from support import app_with_fake_db

from zerver import (
    App,
    Broker,
    Context,
    DbPut,
    Done,
    Fail,
    MemoryBroker,
    Need,
    Publish,
    Response,
    RetryPolicy,
    Slot,
    load_settings,
    step,
)
from zerver.export._spans import SpanKind, StatusCode
from zerver.runtime._messaging_redis import RedisStreamsBroker
from zerver.testing import AppClient, FakeInterpreter, InMemorySpanSink, capture_logs

pytestmark = pytest.mark.anyio

MID: Slot[str] = Slot("message_id")


BrokerFactory = Callable[..., Broker]


@pytest.fixture(params=["memory", "redis"])
def new_broker(request: pytest.FixtureRequest) -> BrokerFactory:
    """Makes a broker of the kind under test: ``new_broker(capacity=...)``."""
    if request.param == "memory":
        return MemoryBroker
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex[:12]}:"  # streams of this test alone

    def make(capacity: int = 10_000) -> Broker:
        return RedisStreamsBroker(server.url, capacity=capacity, key_prefix=prefix, block_ms=50)

    return make


async def depth(broker: Broker, topic: str) -> int:
    """Messages on ``topic`` not yet finished."""
    if isinstance(broker, MemoryBroker):
        return broker.depth(topic)
    assert isinstance(broker, RedisStreamsBroker)
    return await broker.backlog(topic)


async def drain(broker: Broker, topic: str) -> list[Any]:
    if isinstance(broker, MemoryBroker):
        return broker.drain(topic)
    assert isinstance(broker, RedisStreamsBroker)
    try:
        return await broker.drain(topic)
    finally:
        await broker.aclose()  # the app has stopped: close what draining opened


def make_app(broker: Broker) -> tuple[App, InMemorySpanSink, FakeInterpreter]:
    app, _clock, fake = app_with_fake_db("msg", load_settings({}), broker=broker)
    fake.on("db.put audit", result=None, work_ms=1)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    return app, sink, fake


@step(writes=[MID])
def publish_order(ctx: Context) -> Need:
    return Need(
        Publish(topic="orders", message={"order": ctx.params["id"]}, slot=MID), then=accepted
    )


@step(reads=[MID])
def accepted(ctx: Context) -> Done:
    return Done(Response.json({"message_id": ctx.require(MID)}, 202))


async def settle(app: App) -> None:
    """Let consumers run until every message in flight is done (bounded).

    The embedded broker is done when every task waits; Redis answers over a
    socket, so there the loop looks again after a short pause, for at most 10 s.
    """
    local = isinstance(app.broker, MemoryBroker)
    with anyio.fail_after(10):
        for _ in range(2000):
            if local:
                await anyio.wait_all_tasks_blocked()
            else:
                await anyio.sleep(0.005)
            if all(c.stats.in_flight == 0 for c in app.consumers) and all(
                [await depth(app.broker, c.topic) == 0 for c in app.consumers]
            ):
                return


async def test_producer_and_consumer_spans_in_one_trace(new_broker: BrokerFactory) -> None:
    app, sink, _fake = make_app(new_broker())
    seen: list[Any] = []

    @step
    def record_order(ctx: Context) -> Need:
        assert ctx.message is not None
        seen.append((ctx.message.json(), ctx.message.attempt, ctx.request.json()))
        return Need(DbPut(table="audit", key=ctx.message.id, value=ctx.message.json()), then=done)

    @step
    def done(ctx: Context) -> Done:
        return Done(Response.text("ok"))

    app.post("/orders/{id}", publish_order)
    consumer = app.consumer("orders", record_order)
    async with AppClient(app) as c:
        r = await c.post("/orders/7")
        await settle(app)
    assert r.status == 202
    mid = orjson.loads(r.body)["message_id"]
    if isinstance(app.broker, MemoryBroker):
        assert mid == "m1"
    assert seen == [({"order": "7"}, 1, {"order": "7"})]
    assert consumer.stats.received == consumer.stats.processed == 1
    http_trace, consumer_trace = sink.traces
    producer = next(s for s in http_trace if s.name == "queue.publish orders")
    root = consumer_trace[0]
    assert producer.kind == SpanKind.PRODUCER
    assert producer.attributes["messaging.destination.name"] == "orders"
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["messaging.system"] == app.broker.system
    assert producer.attributes["messaging.message.id"] == mid
    assert producer.attributes["messaging.message.body.size"] == len(b'{"order":"7"}')
    assert root.name == "queue.process orders" and root.kind == SpanKind.CONSUMER
    assert root.trace_id == producer.trace_id and root.parent_span_id == producer.span_id
    assert [(link.trace_id, link.span_id) for link in root.links] == [
        (producer.trace_id, producer.span_id)
    ]
    assert root.attributes["messaging.operation.type"] == "process"
    assert root.attributes["messaging.message.id"] == mid
    assert root.status_code == StatusCode.UNSET
    names = {s.name for s in consumer_trace}
    assert {"step.record_order", "db.put audit", "step.done.resume"} <= names


async def test_link_only_when_not_continuing(new_broker: BrokerFactory) -> None:
    app, sink, _fake = make_app(new_broker())

    @step
    def ok(ctx: Context) -> Done:
        return Done(Response.text("ok"))

    app.post("/orders/{id}", publish_order)
    app.consumer("orders", ok, continue_trace=False)
    async with AppClient(app) as c:
        await c.post("/orders/1")
        await settle(app)
    producer = next(s for s in sink.traces[0] if s.kind == SpanKind.PRODUCER)
    root = sink.traces[1][0]
    assert root.trace_id != producer.trace_id and root.parent_span_id == 0
    assert root.links[0].span_id == producer.span_id


async def test_failing_consumer_is_retried_then_dead_lettered(new_broker: BrokerFactory) -> None:
    app, sink, _fake = make_app(new_broker())
    attempts: list[int] = []

    @step
    def flaky(ctx: Context) -> Any:
        assert ctx.message is not None
        attempts.append(ctx.message.attempt)
        if ctx.message.json()["order"] == "boom":
            raise RuntimeError("handler broke")
        if ctx.message.attempt < 2:
            return Fail(503, "try later")
        return Done(Response.text("ok"))

    app.post("/orders/{id}", publish_order)
    consumer = app.consumer(
        "orders", flaky, max_attempts=3, retry=RetryPolicy(backoff_ms=10, jitter=0)
    )
    async with AppClient(app) as c:
        await c.post("/orders/fine")
        await c.post("/orders/boom")
        await settle(app)
    stats = consumer.stats
    assert stats.processed == 1 and stats.dead_lettered == 1 and stats.retried == 3
    assert stats.received == stats.processed + stats.retried + stats.dead_lettered
    assert sorted(attempts) == [1, 1, 2, 2, 3]
    dead = await drain(app.broker, "orders.dead")
    assert [m.json() for m in dead] == [{"order": "boom"}]
    assert dead[0].attempt == 3 and "handler broke" in dead[0].headers["x-zerver-dead-reason"]
    assert dead[0].headers["x-zerver-original-topic"] == "orders"
    failed_roots = [t[0] for t in sink.traces if t[0].status_code == StatusCode.ERROR]
    assert len(failed_roots) == 4  # 1 Fail(503) + 3 raising attempts
    assert all(r.name == "queue.process orders" for r in failed_roots)
    assert {r.attributes["zerver.message.attempt"] for r in failed_roots} == {1, 2, 3}


async def test_full_topic_fails_the_publish_and_never_hangs(new_broker: BrokerFactory) -> None:
    app, _sink, _fake = make_app(new_broker(capacity=1))
    app.post("/orders/{id}", publish_order)
    async with AppClient(app) as c:
        first = await c.post("/orders/1")
        second = await c.post("/orders/2")  # no consumer: the topic stays full
    assert first.status == 202
    assert second.status == 503
    assert app.broker.refused == 1  # type: ignore[attr-defined]


async def test_publish_of_unserialisable_message_is_a_clear_failure(
    new_broker: BrokerFactory,
) -> None:
    app, _sink, _fake = make_app(new_broker())

    @step
    def bad(ctx: Context) -> Need:
        return Need(Publish(topic="t", message=object()), then=accepted)

    app.get("/bad", bad)
    async with AppClient(app) as c:
        r = await c.get("/bad")
    assert r.status == 500 and b"invalid_message" in r.body


async def test_shutdown_finishes_message_in_hand(new_broker: BrokerFactory) -> None:
    app, _sink, _fake = make_app(new_broker())
    started = anyio.Event()
    gate = anyio.Event()

    class Slow(FakeInterpreter):
        async def perform(self, effect: Any, job: Any) -> Any:
            started.set()
            await gate.wait()
            return None

    app.interpreter("db", Slow(app.clock))

    @step
    def write(ctx: Context) -> Need:
        return Need(DbPut(table="x", key="k", value=1, timeout_ms=10_000), then=fin)

    @step
    def fin(ctx: Context) -> Done:
        return Done(Response.text("ok"))

    app.post("/orders/{id}", publish_order)
    consumer = app.consumer("orders", write)
    async with anyio.create_task_group() as tg, AppClient(app) as c:
        await c.post("/orders/1")
        await started.wait()
        tg.start_soon(_release, gate)
        # Leaving the app waited for the message in hand.
    assert consumer.stats.processed == 1 and consumer.stats.in_flight == 0


async def _release(gate: anyio.Event) -> None:
    await anyio.wait_all_tasks_blocked()
    gate.set()


async def test_4xx_is_dead_lettered_at_once_and_continue_counts_as_handled(
    new_broker: BrokerFactory,
) -> None:
    app, _sink, _fake = make_app(new_broker())

    @step
    def judge(ctx: Context) -> Any:
        from zerver import Continue

        assert ctx.message is not None
        if ctx.message.json()["order"] == "bad":
            return Fail(422, "malformed order")
        return Continue  # handled, nothing to answer

    app.post("/orders/{id}", publish_order)
    consumer = app.consumer("orders", judge, max_attempts=5)
    async with AppClient(app) as c:
        await c.post("/orders/bad")
        await c.post("/orders/good")
        await settle(app)
    s = consumer.stats
    assert (s.received, s.processed, s.retried, s.dead_lettered, s.lost) == (2, 1, 0, 1, 0)
    dead = await drain(app.broker, "orders.dead")
    assert dead[0].attempt == 1 and "Fail 422" in dead[0].headers["x-zerver-dead-reason"]


async def test_a_refused_dead_letter_is_counted_as_lost(new_broker: BrokerFactory) -> None:
    app, _sink, _fake = make_app(new_broker(capacity=1))

    @step
    def reject(ctx: Context) -> Fail:
        return Fail(400, "no")

    app.consumer("orders", reject)
    await app.broker.publish("orders.dead", b"{}", {})  # fill the dead-letter topic
    app.post("/orders/{id}", publish_order)
    async with AppClient(app) as c:
        await c.post("/orders/1")
        await settle(app)
    s = app.consumers[0].stats
    assert (s.received, s.dead_lettered, s.lost) == (1, 0, 1)


class _NoAck(MemoryBroker):
    """A broker of the shape the protocol had before ``ack``: the embedded one
    without it."""

    ack = None  # type: ignore[assignment]


async def test_a_broker_without_ack_is_still_served_without_errors() -> None:
    # Typed as the protocol is now; at run time the missing ack is tolerated.
    app, _sink, _fake = make_app(cast(Broker, _NoAck()))
    handled: list[str] = []

    @step
    def ok(ctx: Context) -> Done:
        assert ctx.message is not None
        handled.append(ctx.message.id)
        return Done(Response.text("ok"))

    app.post("/orders/{id}", publish_order)
    consumer = app.consumer("orders", ok)
    with capture_logs() as lines:
        async with AppClient(app) as c:
            await c.post("/orders/1")
            await settle(app)
    assert len(handled) == 1 and consumer.stats.processed == 1
    assert not [x for x in lines if x["event"] == "acknowledging failed"]
