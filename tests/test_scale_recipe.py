"""The scale-out recipe of docs/backends.md, run as written: ``zerver demo --workers 2``
on PostgreSQL (``ZER_VER_DB_URL``) and Redis (``ZER_VER_CACHE_URL``,
``ZER_VER_BROKER_URL``), servers started by the test, traces exported over OTLP.

Which worker process served a request is read from its exported trace: the
test sends each request with a ``traceparent`` of its own, and the trace's
resource names the process (``service.instance.id``, ``process.pid``). So the
test proves, without guessing: a post created through one worker is read
through every worker; the author one worker cached is a cache hit in another;
each published message is consumed by exactly one worker, and the workers'
consumer counters, summed, add up. The kernel spreads new connections over
the workers (``SO_REUSEPORT``); reads go on until every worker has served one,
at most :data:`MAX_READS` of them.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from demo_process import operator_env, zerver_process
from pg_server import PgServer, pg_server  # noqa: F401 - the session fixture
from redis_server import RedisServer, redis_server  # noqa: F401 - the session fixture

from zerver.export import OtlpReceiver
from zerver.export._receiver import attributes_of

WORKERS = 2
"""docs/backends.md shows ``--workers 4``; two are enough to prove sharing, and the
machines that run the tests may have two cores."""
MAX_READS = 40
"""Reads of the new post, each on a new connection: with two workers the chance that
40 new connections all reach the same one is 2**-39."""
POSTS = 4
REDIS_DB = 7
_WAIT_S = 20.0


@dataclass(frozen=True, slots=True)
class Served:
    """The spans one process made of one trace."""

    instance: str
    pid: int
    spans: list[dict[str, Any]]

    def span(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.spans if s["name"] == name), None)


def _traces(receiver: OtlpReceiver) -> dict[tuple[str, str], Served]:
    """Every span received so far, by trace id (hex) and the process that made it (a
    message's trace runs through the process that published and the one that consumed)."""
    out: dict[tuple[str, str], Served] = {}
    for req in list(receiver.requests):
        if not 200 <= req.status < 300:
            continue
        doc = req.decode()
        assert isinstance(doc, dict), "the recipe exports OTLP/JSON"
        for rs in doc.get("resourceSpans", ()):
            resource = attributes_of(rs.get("resource", {}))
            instance = str(resource["service.instance.id"])
            for ss in rs.get("scopeSpans", ()):
                for span in ss.get("spans", ()):
                    key = (span["traceId"], instance)
                    if key not in out:
                        out[key] = Served(
                            instance=instance, pid=int(str(resource["process.pid"])), spans=[]
                        )
                    out[key].spans.append(span)
    return out


def _find(traces: dict[tuple[str, str], Served], trace_id: str, root: str) -> list[Served]:
    """The processes' parts of trace ``trace_id`` that hold a span named ``root``."""
    return [s for (t, _), s in traces.items() if t == trace_id and s.span(root) is not None]


def _wait_for_trace(receiver: OtlpReceiver, trace_id: str, root: str) -> Served:
    """The part of a trace holding its span ``root``, once it arrived (waits on the
    receiver, bounded); that span must have been made once, by one process."""
    deadline = time.monotonic() + _WAIT_S
    while True:
        seen = len(receiver.requests)
        found = _find(_traces(receiver), trace_id, root)
        if found:
            assert len(found) == 1, f"{root!r} of trace {trace_id} made by {len(found)} processes"
            return found[0]
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {root!r} span of trace {trace_id} within {_WAIT_S} s"
        receiver.wait_for_requests(seen + 1, timeout=remaining)


def _traceparent() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def _fresh(port: int, method: str, path: str, **kwargs: Any) -> tuple[str, httpx.Response]:
    """One request on a new connection (so the kernel may pick any worker), traced by
    the test: returns its trace id and the response."""
    trace_id, headers = _traceparent()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        return trace_id, client.request(method, path, headers=headers, **kwargs)


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[str]:  # noqa: F811 - the fixture above
    """A database of the session's Redis server, empty before and after the test."""
    import redis

    url = f"redis://{redis_server.host}:{redis_server.port}/{REDIS_DB}"
    raw = redis.Redis.from_url(url)
    raw.flushdb()
    try:
        yield url
    finally:
        raw.flushdb()
        raw.close()


def test_the_demo_recipe_shares_posts_cache_and_messages_across_workers(
    tmp_path: Path,
    pg_server: PgServer,  # noqa: F811 - the fixture imported above
    redis_db: str,
) -> None:
    import psycopg

    db_url = pg_server.new_schema()
    with OtlpReceiver() as receiver:
        env = operator_env(
            tmp_path,
            tmp_path / "state",
            ZER_VER_DB_URL=db_url,
            ZER_VER_CACHE_URL=redis_db,
            ZER_VER_BROKER_URL=redis_db,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            OTEL_TRACES_EXPORTER="otlp",  # the default, which operator_env turned off
            # The test's own: export each trace within 50 ms, not 5 s, so that it
            # can wait for every request's trace as it goes.
            OTEL_BSP_SCHEDULE_DELAY="50",
        )
        args = ["demo", "--workers", str(WORKERS)]
        with zerver_process(args, env, tmp_path) as (proc, port, _lines):
            # Posts created through whichever workers the connections reach.
            created: dict[str, str] = {}  # post id -> trace id of its POST
            for n in range(POSTS):
                body = {"title": f"Scaled {n}", "body": "Text", "author_id": "alan"}
                trace_id, r = _fresh(port, "POST", "/blogs/posts", json=body)
                assert r.status_code == 201, r.text
                created[r.json()["id"]] = trace_id
            post_id, post_trace = next(iter(created.items()))
            creator = _wait_for_trace(
                receiver, post_trace, "http.server: POST /blogs/posts"
            ).instance

            # The first post read until every worker has served it.
            reads: list[Served] = []
            answers: set[bytes] = set()
            for _ in range(MAX_READS):
                trace_id, r = _fresh(port, "GET", f"/blogs/posts/{post_id}")
                assert r.status_code == 200, r.text
                answers.add(r.content)
                reads.append(
                    _wait_for_trace(receiver, trace_id, "http.server: GET /blogs/posts/{id}")
                )
                if len({s.instance for s in reads}) == WORKERS:
                    break

            # Every message consumed: its consumer span arrives in the POST's trace.
            for trace_id in created.values():
                _wait_for_trace(receiver, trace_id, "queue.process blog.post.created")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err.decode(errors="replace")
        traces = _traces(receiver)

    # Read through every worker, the creating one and the others, with one answer.
    readers = {s.instance for s in reads}
    assert len(readers) == WORKERS, f"{len(reads)} reads reached only {readers}"
    assert len({s.pid for s in reads}) == WORKERS
    assert readers - {creator}, "no worker but the creator read the post"
    assert len(answers) == 1
    page = orjson.loads(answers.pop())
    assert page["post"]["title"] == "Scaled 0"
    assert page["author"]["name"] == "Alan Turing"

    # The author cached by the first read is a hit in another worker.
    first, later = reads[0], reads[1:]
    miss = first.span("cache.get author_profile")
    assert miss is not None and attributes_of(miss)["cache.hit"] is False
    assert first.span("cache.set author_profile") is not None
    others = [s for s in later if s.instance != first.instance]
    assert others, "every later read came back to the worker that filled the cache"
    for served in later:
        hit = served.span("cache.get author_profile")
        assert hit is not None and attributes_of(hit)["cache.hit"] is True
        assert attributes_of(hit)["db.system.name"] == "redis"
        assert served.span("db.get author") is None

    # Each message consumed once, by one worker of any.
    for trace_id in created.values():
        consumed = [
            span
            for part in _find(traces, trace_id, "queue.process blog.post.created")
            for span in part.spans
            if span["name"] == "queue.process blog.post.created"
        ]
        assert len(consumed) == 1, consumed
        assert consumed[0].get("status", {}).get("code") != 2  # not ERROR
        assert attributes_of(consumed[0])["messaging.system"] == "redis"

    # Each worker reports its counters at shutdown; summed, they add up.
    stopped = [
        line
        for line in (orjson.loads(raw) for raw in out.splitlines() if raw.startswith(b"{"))
        if line.get("event") == "consumer stopped"
    ]
    assert len(stopped) == WORKERS, stopped
    assert all(line["topic"] == "blog.post.created" for line in stopped)
    assert all(line["in_flight"] == 0 for line in stopped)
    total = {k: sum(line[k] for line in stopped) for k in ("received", "processed", "retried")}
    dead = sum(line["dead_lettered"] + line["lost"] for line in stopped)
    assert total["received"] == total["processed"] + total["retried"] + dead
    assert (total["received"], total["processed"], dead) == (POSTS, POSTS, 0)

    # The feed the consumer fills has each post once; the stream holds nothing unacknowledged.
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(b'SELECT key FROM "feed" ORDER BY key').fetchall()
    assert [r[0] for r in rows] == sorted(created)
    import redis

    raw = redis.Redis.from_url(redis_db)
    try:
        assert raw.xlen("zerver:stream:blog.post.created") == 0
    finally:
        raw.close()
