"""The demo routes in-process against real SQLite."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from zerver import App, load_settings
from zerver.demo import SEED_AUTHORS, SEED_POSTS, create_app
from zerver.testing import AppClient, RecordCapture

pytestmark = pytest.mark.anyio


@pytest.fixture
def app(tmp_path: Path) -> App:
    """The demo on a fresh SQLite file."""
    return create_app(settings=load_settings({}, db_path=str(tmp_path / "demo.sqlite3")))


async def test_post_page_miss_then_hit(app: App) -> None:
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as c:
        first = await c.get("/blogs/posts/1")
        second = await c.get("/blogs/posts/1")
        page = await c.get("/blogs/posts/1?format=html")
    expected = {"post": SEED_POSTS["1"], "author": SEED_AUTHORS["ada"]}
    assert first.status == 200 and orjson.loads(first.body) == expected
    assert second.status == 200 and orjson.loads(second.body) == expected
    names_miss = [j.name for j in cap.records[0].jobs]
    assert names_miss == [
        "db.get blog_post",
        "cache.get author_profile",
        "step.render_blog_post_page.resume",
        "db.get author",
        "step.refill_author_cache.resume",
        "cache.set author_profile",
        "step.render_blog_post_page.resume",
    ]
    assert cap.records[0].jobs[1].result_meta == {"cache.hit": False}
    names_hit = [j.name for j in cap.records[1].jobs]
    assert names_hit == [
        "db.get blog_post",
        "cache.get author_profile",
        "step.render_blog_post_page.resume",
    ]
    assert cap.records[1].jobs[1].result_meta == {"cache.hit": True}
    assert page.status == 200 and page.header("content-type") == "text/html; charset=utf-8"
    assert b"<h1>Hello, zerver</h1>" in page.body
    assert cap.records[2].steps[-1].render_phase == "template"


async def test_unknown_post_is_404_without_db_write(app: App) -> None:
    cap = RecordCapture()
    app.subscribe(cap)
    async with AppClient(app) as c:
        r = await c.get("/blogs/posts/nope")
    assert r.status == 404
    assert orjson.loads(r.body) == {"error": "post not found", "key": "nope"}
    assert not any(j.name.startswith(("db.put", "cache.set")) for j in cap.last.jobs)


async def test_comments(app: App) -> None:
    async with AppClient(app) as c:
        r = await c.get("/blogs/posts/1/comments")
        missing = await c.get("/blogs/posts/99/comments")
    body = orjson.loads(r.body)
    assert [x["id"] for x in body["comments"]] == ["c1", "c2"]
    assert missing.status == 404


async def test_create_post_and_read_it_back(app: App) -> None:
    async with AppClient(app) as c:
        r = await c.post("/blogs/posts", json={"title": "New", "body": "Text", "author_id": "alan"})
        assert r.status == 201
        new_id = orjson.loads(r.body)["id"]
        assert r.header("location") == f"/blogs/posts/{new_id}"
        back = await c.get(f"/blogs/posts/{new_id}")
    assert back.status == 200
    assert orjson.loads(back.body)["post"]["title"] == "New"
    assert orjson.loads(back.body)["author"]["name"] == "Alan Turing"


@pytest.mark.parametrize(
    ("body", "reason", "key"),
    [
        (b"{not json", "invalid JSON body", "body"),
        (b"[1, 2]", "body must be a JSON object", "body"),
        (b'{"title": "", "body": "b", "author_id": "a"}', "title must be a non-empty", "title"),
        (b'{"title": "t", "author_id": "a"}', "body must be a non-empty string", "body"),
        (b'{"title": "t", "body": "b", "author_id": 7}', "author_id must be", "author_id"),
        (b'{"title": "t", "body": "b", "author_id": "a", "x": 1}', "unknown field 'x'", "x"),
        (
            orjson.dumps({"title": "t" * 201, "body": "b", "author_id": "a"}),
            "title must be at most 200",
            "title",
        ),
    ],
)
async def test_create_post_rejects_bad_input(app: App, body: bytes, reason: str, key: str) -> None:
    async with AppClient(app) as c:
        r = await c.post("/blogs/posts", body=body)
    assert r.status == 400
    err = orjson.loads(r.body)
    assert reason in err["error"] and err["key"] == key


async def test_healthz(app: App) -> None:
    async with AppClient(app) as c:
        r = await c.get("/healthz")
    assert r.status == 200 and orjson.loads(r.body) == {"status": "ok"}
