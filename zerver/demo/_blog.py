"""The demo service: a small blog on SQLite.

Routes:

* ``GET /blogs/posts/{id}`` — one step needs, in parallel (join=all),
  ``db.get blog_post`` and ``cache.get author_profile``; its continuation
  renders JSON (``?format=html`` renders HTML). A cache miss falls through
  to ``db.get author`` and refills the cache. Unknown id → 404.
* ``GET /blogs/posts/{id}/comments`` — the post's comments from the DB.
* ``GET /blogs/posts/{id}/with-comments`` — the post from the DB and the
  comments fetched over real HTTP from this service's own comments route
  (``ZER_VER_DEMO_BASE_URL``, default: the local address of the connection
  the request came in on), so one trace shows the client and server spans of
  the hop. The ``Host`` header never chooses where the server connects: a
  client could otherwise make it fetch any address. A reply that is not the
  comments route's JSON fails the request with 502, as a failed fetch does.
* ``POST /blogs/posts`` — validates the JSON body (415 for a body that is
  not JSON, 422 for an ``author_id`` that names no author), writes with
  ``db.put``, publishes ``blog.post.created`` (optional: a refused publish
  leaves the post stored), answers 201 with the new id.
* Consumer of ``blog.post.created`` — adds the post to the ``feed`` table
  (``db.put feed``, keyed by the post id, so a redelivery writes it again
  unchanged). With several workers on a shared broker each message is
  consumed by one of them.
* ``GET /healthz``.
"""

from __future__ import annotations

import html
import random
import secrets
from typing import Any
from urllib.parse import quote

from zerver._app import App
from zerver._config import Settings
from zerver.core._clock import Clock
from zerver.core._decisions import Continue, Decision, Done, Fail, Join, Mode, Need
from zerver.core._effects import CacheGet, CacheSet, DbGet, DbPut, DbQuery, HttpGet, HttpResult
from zerver.core._http import Request, Response
from zerver.core._slots import Context, Slot
from zerver.core._steps import Step, step
from zerver.runtime._messaging import Publish

__all__ = ["SEED_AUTHORS", "SEED_COMMENTS", "SEED_POSTS", "create_app"]

Row = dict[str, Any]

POST: Slot[Row | None] = Slot("post")
AUTHOR: Slot[Row | None] = Slot("author")
COMMENTS: Slot[list[Row]] = Slot("comments")
NEW_POST: Slot[Row] = Slot("new_post")
REMOTE_COMMENTS: Slot[HttpResult] = Slot("remote_comments")

SEED_AUTHORS: dict[str, Row] = {
    "ada": {"id": "ada", "name": "Ada Lovelace", "bio": "Writes about engines."},
    "alan": {"id": "alan", "name": "Alan Turing", "bio": "Writes about machines."},
}
SEED_POSTS: dict[str, Row] = {
    "1": {
        "id": "1",
        "title": "Hello, zerver",
        "body": "Steps, effects and traces.",
        "author_id": "ada",
        "created": "2026-01-01T10:00:00Z",
    },
    "2": {
        "id": "2",
        "title": "Parking explained",
        "body": "Why a job waits.",
        "author_id": "alan",
        "created": "2026-01-02T10:00:00Z",
    },
    "3": {
        "id": "3",
        "title": "Promotion thresholds",
        "body": "Spans only when they matter.",
        "author_id": "ada",
        "created": "2026-01-03T10:00:00Z",
    },
}
SEED_COMMENTS: dict[str, Row] = {
    "c1": {"id": "c1", "post_id": "1", "author": "alan", "text": "Nice.", "created": "1"},
    "c2": {"id": "c2", "post_id": "1", "author": "ada", "text": "Thanks!", "created": "2"},
    "c3": {"id": "c3", "post_id": "2", "author": "ada", "text": "Clear.", "created": "3"},
}

_MAX_TITLE = 200
_MAX_BODY = 20_000


# -- GET /blogs/posts/{id} ------------------------------------------------------------


@step(reads=[POST, AUTHOR])
def render_blog_post_page(ctx: Context) -> Decision:
    post = ctx.optional(POST)
    if post is None:
        return Fail(404, "post not found", key=ctx.params["id"])
    author = ctx.optional(AUTHOR)
    if author is None:
        # Cache miss: fall through to the database, then refill the cache.
        return Need(
            DbGet(table="author", key=str(post.get("author_id", "")), slot=AUTHOR),
            then=refill_author_cache,
        )
    if ctx.request.query_params.get("format") == "html":
        return Done(Response.html(_post_html(post, author)))
    return Done(Response.json({"post": post, "author": author}))


@step(reads=[POST, AUTHOR], writes=[AUTHOR])
def refill_author_cache(ctx: Context) -> Decision:
    author = ctx.optional(AUTHOR)
    if author is None:
        return Fail(404, "author not found", key=str((ctx.optional(POST) or {}).get("author_id")))
    return Need(
        CacheSet(namespace="author_profile", key=ctx.params["id"], value=author, required=False),
        then=render_blog_post_page,
    )


@step(writes=[POST, AUTHOR])
def load_blog_post_page(ctx: Context) -> Decision:
    post_id = ctx.params["id"]
    return Need(
        [
            DbGet(table="blog_post", key=post_id, slot=POST),
            CacheGet(namespace="author_profile", key=post_id, slot=AUTHOR, required=False),
        ],
        mode=Mode.PARALLEL,
        join=Join.ALL,
        then=render_blog_post_page,
    )


def _post_html(post: Row, author: Row) -> str:
    e = html.escape
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{e(str(post.get('title', '')))}</title></head><body>"
        f"<article><h1>{e(str(post.get('title', '')))}</h1>"
        f"<p class='byline'>by {e(str(author.get('name', '')))}</p>"
        f"<div>{e(str(post.get('body', '')))}</div></article></body></html>"
    )


# -- GET /blogs/posts/{id}/comments ------------------------------------------------


@step(writes=[POST, COMMENTS])
def load_comments(ctx: Context) -> Decision:
    post_id = ctx.params["id"]
    return Need(
        [
            DbGet(table="blog_post", key=post_id, slot=POST),
            DbQuery(table="comment", where={"post_id": post_id}, order_by="created", slot=COMMENTS),
        ],
        then=render_comments,
    )


@step(reads=[POST, COMMENTS])
def render_comments(ctx: Context) -> Decision:
    if ctx.optional(POST) is None:
        return Fail(404, "post not found", key=ctx.params["id"])
    return Done(Response.json({"post_id": ctx.params["id"], "comments": ctx.require(COMMENTS)}))


# -- GET /blogs/posts/{id}/with-comments ------------------------------------------


_COMMENTS_FETCH = "comments"  # the HttpGet's name: its span is ``http.get comments``
# A wildcard bind address is not one to connect to; its loopback twin is.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def own_base_url(request: Request, settings: Settings) -> str:
    """``http://host:port`` of this very server, for a request it is serving.

    The local end of the request's connection (the configured address when
    there is no socket, as in-process tests). Never the ``Host`` header: the
    client writes that, and a server that connects where its clients say is a
    proxy to any address they choose (SSRF).
    """
    host, port = request.server or (settings.host, settings.port)
    host = _LOOPBACK.get(host, host)
    if ":" in host:
        host = f"[{host.replace('%', '%25')}]"  # IPv6, with its zone id escaped
    return f"http://{host}:{port}"


def _comments_reply(reply: HttpResult | None) -> list[Row] | None:
    """The comments in a reply of the comments route, or None when it is not such a reply.

    404 is the other service not knowing the post: no comments. Anything but
    a 200 whose body is ``{"comments": [{...}, ...]}`` is a bad reply.
    """
    if reply is None:
        return None
    if reply.status == 404:
        return []
    if reply.status != 200:
        return None
    try:
        body = reply.json()
    except ValueError:
        return None
    comments = body.get("comments") if isinstance(body, dict) else None
    if not isinstance(comments, list) or not all(isinstance(c, dict) for c in comments):
        return None
    return comments


def _with_comments_steps(settings: Settings) -> Step:
    """The post and, over real HTTP, this service's own comments route."""
    base_url = settings.demo_base_url

    @step(reads=[POST, REMOTE_COMMENTS])
    def render_post_with_comments(ctx: Context) -> Decision:
        post = ctx.optional(POST)
        if post is None:
            return Fail(404, "post not found", key=ctx.params["id"])
        comments = _comments_reply(ctx.optional(REMOTE_COMMENTS))
        if comments is None:
            # The same answer as any failed required effect: the fetch gave nothing usable.
            return Fail(
                502, "required effect failed: invalid_reply", key=f"http.get {_COMMENTS_FETCH}"
            )
        return Done(Response.json({"post": post, "comments": comments}))

    @step(writes=[POST, REMOTE_COMMENTS])
    def load_post_with_comments(ctx: Context) -> Decision:
        post_id = ctx.params["id"]
        base = base_url or own_base_url(ctx.request, settings)
        return Need(
            [
                DbGet(table="blog_post", key=post_id, slot=POST),
                HttpGet(
                    url=f"{base.rstrip('/')}/blogs/posts/{quote(post_id, safe='')}/comments",
                    name=_COMMENTS_FETCH,
                    slot=REMOTE_COMMENTS,
                    timeout_ms=2000,
                ),
            ],
            join=Join.ALL,
            then=render_post_with_comments,
        )

    return load_post_with_comments


# -- POST /blogs/posts ------------------------------------------------------------


def _is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` names JSON (``application/json``, ``application/*+json``).

    No ``Content-Type`` at all is read as JSON: RFC 9110 lets a recipient
    examine an unlabelled body, and the parse that follows still refuses
    anything that is not JSON (400).
    """
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


@step(writes=[NEW_POST])
def validate_new_post(ctx: Context) -> Decision:
    if not _is_json(ctx.request.header("content-type")):
        return Fail(415, "body must be application/json", key="content-type")
    try:
        data = ctx.request.json()
    except ValueError as exc:
        return Fail(400, str(exc), key="body")
    if not isinstance(data, dict):
        return Fail(400, "body must be a JSON object", key="body")
    fields: dict[str, int] = {"title": _MAX_TITLE, "body": _MAX_BODY, "author_id": 64}
    for name, limit in fields.items():
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            return Fail(400, f"{name} must be a non-empty string", key=name)
        if len(value) > limit:
            return Fail(400, f"{name} must be at most {limit} characters", key=name)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        return Fail(400, f"unknown field {unknown[0]!r}", key=unknown[0])
    ctx.put(NEW_POST, {k: data[k].strip() for k in fields})
    return Continue


@step(reads=[NEW_POST], writes=[AUTHOR])
def check_author(ctx: Context) -> Decision:
    """A post must name an author that exists: look it up before storing anything."""
    author_id = ctx.require(NEW_POST)["author_id"]
    return Need(DbGet(table="author", key=author_id, slot=AUTHOR), then=create_post)


@step(reads=[NEW_POST, AUTHOR], writes=[NEW_POST])
def create_post(ctx: Context) -> Decision:
    post: Row = ctx.require(NEW_POST).copy()
    if ctx.optional(AUTHOR) is None:
        # Well-formed, but it names no author: 422, and nothing is stored.
        return Fail(422, "author_id names no author", key="author_id")
    post["id"] = secrets.token_hex(6)
    ctx.put(NEW_POST, post)
    return Need(DbPut(table="blog_post", key=post["id"], value=post), then=announce_post)


POST_CREATED = "blog.post.created"
"""The topic ``POST /blogs/posts`` publishes each stored post on."""


@step(reads=[NEW_POST])
def announce_post(ctx: Context) -> Decision:
    post = ctx.require(NEW_POST)
    event = {"id": post["id"], "author_id": post["author_id"], "title": post["title"]}
    return Need(Publish(topic=POST_CREATED, message=event, required=False), then=created)


@step(reads=[NEW_POST])
def created(ctx: Context) -> Decision:
    post_id = ctx.require(NEW_POST)["id"]
    return Done(Response.json({"id": post_id}, 201, [("location", f"/blogs/posts/{post_id}")]))


@step
def add_to_feed(ctx: Context) -> Decision:
    """A ``blog.post.created`` message: the post joins the feed (idempotent by post id)."""
    try:
        event = ctx.message.json() if ctx.message is not None else None
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str):
        # A 4xx: the message itself is wrong, so it is dead-lettered, not retried.
        return Fail(422, "not a blog.post.created event", key="body")
    return Need(DbPut(table="feed", key=event["id"], value=event))


@step
def healthz(ctx: Context) -> Decision:
    return Done(Response.json({"status": "ok"}))


async def _seed(app: App) -> None:
    from zerver.runtime.interpreters import PostgresInterpreter, SqliteInterpreter

    db = app.interpreters.get("db")
    if not isinstance(db, SqliteInterpreter | PostgresInterpreter):
        return  # another database (or a fake in tests): seeding is its business
    if await db.get("blog_post", "1") is None:
        await db.put_many("author", SEED_AUTHORS)
        await db.put_many("blog_post", SEED_POSTS)
        await db.put_many("comment", SEED_COMMENTS)


def create_app(
    *,
    settings: Settings | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> App:
    """Build the demo blog app (seeded on first start, on SQLite or PostgreSQL)."""
    app = App("zerver-demo", settings=settings, clock=clock, version="0.1.0", rng=rng)
    app.get("/blogs/posts/{id}", load_blog_post_page)
    app.get("/blogs/posts/{id}/comments", load_comments)
    app.get("/blogs/posts/{id}/with-comments", _with_comments_steps(app.settings))
    app.post("/blogs/posts", validate_new_post, check_author)
    app.get("/healthz", healthz)
    app.consumer(POST_CREATED, add_to_feed)
    app.on_startup(_seed)
    return app
