"""The demo routes against real SQLite: in-process, and over real sockets where the wire matters."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import httpx
import orjson
import pytest
from support import served

from zerver import App, Request, load_settings
from zerver.demo import SEED_AUTHORS, SEED_POSTS, create_app
from zerver.demo._blog import own_base_url
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


# -- POST /blogs/posts: media type and author --------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",  # what curl -d sends by default
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/jsonx",
        "json",
        "",
    ],
)
async def test_create_post_refuses_a_body_that_is_not_json_with_415(
    app: App, content_type: str
) -> None:
    cap = RecordCapture()
    app.subscribe(cap)
    body = orjson.dumps({"title": "t", "body": "b", "author_id": "ada"})
    async with AppClient(app) as c:
        r = await c.post("/blogs/posts", body=body, headers=[("content-type", content_type)])
    assert r.status == 415
    assert orjson.loads(r.body) == {"error": "body must be application/json", "key": "content-type"}
    assert cap.last.jobs == []  # refused before any effect


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "Application/JSON; charset=utf-8", "application/vnd.blog+json"],
)
async def test_create_post_accepts_json_media_types(app: App, content_type: str) -> None:
    body = orjson.dumps({"title": "t", "body": "b", "author_id": "ada"})
    async with AppClient(app) as c:
        r = await c.post("/blogs/posts", body=body, headers=[("content-type", content_type)])
    assert r.status == 201


@pytest.mark.parametrize("author_id", ["nobody", "ADA", " x "])
async def test_create_post_with_unknown_author_is_422_and_stores_nothing(
    app: App, author_id: str
) -> None:
    cap = RecordCapture()
    app.subscribe(cap)
    post = {"title": "Orphan", "body": "No author.", "author_id": author_id}
    async with AppClient(app) as c:
        r = await c.post("/blogs/posts", json=post)
    assert r.status == 422
    assert orjson.loads(r.body) == {"error": "author_id names no author", "key": "author_id"}
    assert [j.name for j in cap.last.jobs] == ["db.get author", "step.create_post.resume"]
    assert not any(j.name.startswith("db.put") for j in cap.last.jobs)


# -- GET /blogs/posts/{id}/with-comments: where it connects, what it accepts --------


class Listener:
    """A TCP listener on 127.0.0.1 that records each request head and answers ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.heads: list[bytes] = []

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            head = b""
            with anyio.move_on_after(5):
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    try:
                        head += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
            self.heads.append(head)
            await stream.send(self.reply)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        """Listen while the block runs; yields the port."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            try:
                yield port
            finally:
                tg.cancel_scope.cancel()


def _http_reply(status: str, content_type: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


# Host forms a server must accept; the bait listens on 127.0.0.1:{port}.
@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}"])
async def test_with_comments_never_connects_where_the_host_header_says(app: App, host: str) -> None:
    # Before: the outbound URL was built from Host, so this listener got the request.
    bait = Listener(_http_reply("200 OK", "application/json", b'{"comments": []}'))
    async with (
        bait.serving() as port,
        served(app) as url,
        httpx.AsyncClient(timeout=5) as client,
    ):
        r = await client.get(
            f"{url}/blogs/posts/1/with-comments",
            headers={"host": host.format(port=port)},
        )
    assert bait.heads == []
    assert r.status_code == 200
    assert [c["id"] for c in r.json()["comments"]] == ["c1", "c2"]  # from this very server


async def _with_comments(
    tmp_path: Path, upstream: Listener, post: str, cap: RecordCapture | None = None
) -> httpx.Response:
    """GET ``/blogs/posts/{post}/with-comments`` from the served demo, whose comments
    come from ``upstream``; ``cap``, if given, records the demo's requests."""
    async with upstream.serving() as port:
        app = create_app(
            settings=load_settings(
                {}, db_path=str(tmp_path / "demo.sqlite3"), demo_base_url=f"http://127.0.0.1:{port}"
            )
        )
        if cap is not None:
            app.subscribe(cap)
        async with served(app) as url, httpx.AsyncClient(timeout=5) as client:
            return await client.get(f"{url}/blogs/posts/{post}/with-comments")


BAD_REPLIES = [
    _http_reply("200 OK", "text/html", b"<html>not json</html>"),
    _http_reply("200 OK", "application/json", b"{truncated"),
    _http_reply("200 OK", "application/json", b'["a", "list"]'),
    _http_reply("200 OK", "application/json", b'{"no_comments": []}'),
    _http_reply("200 OK", "application/json", b'{"comments": "none"}'),
    _http_reply("200 OK", "application/json", b'{"comments": [1, 2]}'),
    _http_reply("302 Found", "text/plain", b"elsewhere"),
    _http_reply("403 Forbidden", "text/plain", b"no"),
]


@pytest.mark.parametrize("reply", BAD_REPLIES, ids=lambda r: r.split(b"\r\n\r\n")[-1].decode())
async def test_with_comments_answers_502_for_a_bad_reply(tmp_path: Path, reply: bytes) -> None:
    upstream = Listener(reply)
    cap = RecordCapture()
    r = await _with_comments(tmp_path, upstream, "1", cap)
    assert upstream.heads[0].startswith(b"GET /blogs/posts/1/comments HTTP/1.1\r\n")
    assert r.status_code == 502
    assert r.json() == {
        "error": "required effect failed: invalid_reply",
        "key": "http.get comments",
    }
    assert not cap.last.system_fault  # a clean answer, not a crash of the step


async def test_with_comments_reads_404_as_no_comments(tmp_path: Path) -> None:
    upstream = Listener(_http_reply("404 Not Found", "application/json", b'{"error":"x"}'))
    r = await _with_comments(tmp_path, upstream, "2")
    assert r.status_code == 200
    assert r.json() == {"post": SEED_POSTS["2"], "comments": []}


async def test_with_comments_answers_502_when_the_fetch_fails(tmp_path: Path) -> None:
    upstream = Listener(_http_reply("503 Service Unavailable", "text/plain", b"busy"))
    r = await _with_comments(tmp_path, upstream, "1")
    assert r.status_code == 502
    assert r.json()["key"] == "http.get comments"


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (("127.0.0.1", 8081), "http://127.0.0.1:8081"),
        (("10.1.2.3", 80), "http://10.1.2.3:80"),
        (("::1", 8080), "http://[::1]:8080"),
        (("fe80::1%eth0", 8080), "http://[fe80::1%25eth0]:8080"),
        (("0.0.0.0", 9000), "http://127.0.0.1:9000"),
        (("::", 9000), "http://[::1]:9000"),
        (None, "http://127.0.0.1:7000"),  # no socket: the configured address
    ],
)
def test_own_base_url_is_the_local_end_of_the_connection(
    server: tuple[str, int] | None, expected: str
) -> None:
    settings = load_settings({}, host="0.0.0.0", port=7000)
    request = Request(
        method="GET", path="/", headers=[(b"host", b"attacker.example:1")], server=server
    )
    assert own_base_url(request, settings) == expected
