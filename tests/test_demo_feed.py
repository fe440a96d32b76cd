"""The demo's ``blog.post.created`` messages: published by ``POST /blogs/posts`` once the
post is stored, consumed into the ``feed`` table; a message that is not such an event
is dead-lettered at once, never retried, and the feed stays as it was."""

from __future__ import annotations

from pathlib import Path

import anyio
import orjson
import pytest

from zerver import App, MemoryBroker, load_settings
from zerver.demo import create_app
from zerver.demo._blog import POST_CREATED
from zerver.runtime.interpreters import SqliteInterpreter
from zerver.testing import AppClient, capture_logs

pytestmark = pytest.mark.anyio


@pytest.fixture
def app(tmp_path: Path) -> App:
    """The demo on a fresh SQLite file (and its embedded broker)."""
    return create_app(settings=load_settings({}, db_path=str(tmp_path / "demo.sqlite3")))


async def _settled(app: App, ended: int) -> None:
    """Wait (bounded) until the consumer has finished ``ended`` deliveries."""
    [consumer] = app.consumers
    with anyio.fail_after(5):
        while (
            consumer.stats.processed + consumer.stats.retried + consumer.stats.dead_lettered < ended
            or consumer.stats.in_flight
        ):
            await anyio.sleep(0.005)


async def test_a_created_post_is_published_and_joins_the_feed(app: App) -> None:
    assert isinstance(app.broker, MemoryBroker)
    db = app.interpreters["db"]
    assert isinstance(db, SqliteInterpreter)
    async with AppClient(app) as c:
        r = await c.post("/blogs/posts", json={"title": "Fed", "body": "Text", "author_id": "ada"})
        assert r.status == 201
        post_id = orjson.loads(r.body)["id"]
        await _settled(app, 1)
        assert await db.get("feed", post_id) == {"id": post_id, "author_id": "ada", "title": "Fed"}
        # A refused post publishes nothing.
        bad = await c.post("/blogs/posts", json={"title": "T", "body": "B", "author_id": "nobody"})
        assert bad.status == 422
    [consumer] = app.consumers
    stats = consumer.stats
    assert (stats.received, stats.processed, stats.retried, stats.dead_lettered) == (1, 1, 0, 0)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"author_id": "ada"}', b'{"id": 7}', b""],
    ids=["not-json", "a-list", "no-id", "id-not-a-string", "empty"],
)
async def test_a_message_that_is_not_an_event_is_dead_lettered_not_retried(
    app: App, body: bytes
) -> None:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    db = app.interpreters["db"]
    assert isinstance(db, SqliteInterpreter)
    async with AppClient(app):
        await broker.publish(POST_CREATED, body, {})
        await _settled(app, 1)
        assert await db.query("feed") == []
    [consumer] = app.consumers
    stats = consumer.stats
    assert (stats.received, stats.processed, stats.retried, stats.dead_lettered) == (1, 0, 0, 1)
    [dead] = broker.drain(f"{POST_CREATED}.dead")
    assert dead.body == body
    assert dead.headers["x-zerver-dead-reason"] == "Fail 422: not a blog.post.created event"


async def test_each_consumer_reports_its_counters_when_the_app_stops(app: App) -> None:
    with capture_logs() as logs:
        async with AppClient(app) as c:
            r = await c.post("/blogs/posts", json={"title": "T", "body": "B", "author_id": "ada"})
            assert r.status == 201
            await _settled(app, 1)
    [line] = [e for e in logs if e["event"] == "consumer stopped"]
    assert line["topic"] == POST_CREATED
    assert {k: line[k] for k in ("received", "processed", "retried", "dead_lettered")} == {
        "received": 1,
        "processed": 1,
        "retried": 0,
        "dead_lettered": 0,
    }
    assert (line["lost"], line["in_flight"]) == (0, 0)
