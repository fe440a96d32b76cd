"""The SQLite interpreter: the embedded default database, run off the event loop.

Each table is a namespace of JSON documents keyed by a string::

    CREATE TABLE IF NOT EXISTS "<table>" (key TEXT PRIMARY KEY, value TEXT NOT NULL)

created on first use. Table and field names are validated against an
identifier pattern before they reach SQL; every value travels as a bound
parameter.

Rules this module keeps:

* A job first takes a connection from a bounded pool. The pool is guarded by
  a :class:`~zerver.runtime._park.ConcurrencyLimiter` named ``db_pool``, so a job that
  finds every connection busy parks with cause ``backpressure``.
* The query itself runs off the event loop inside an ``io_wait`` park episode
  with token ``sqlite``; the event loop never blocks on the database. On
  asyncio each pooled connection has a thread of its own. The threads take
  statements from one shared ``queue.SimpleQueue``, so a thread that has just
  finished takes the next waiting statement without going to sleep; the
  statements asked for in one turn of the loop go on it together
  (:class:`_Outbox`), and the answers reach the loop through
  :class:`_Answers`, one loop wake-up for every answer ready by then. Under
  load that halves the thread switches per statement against a queue per
  thread and a ``call_soon_threadsafe`` per answer, and a call through
  ``anyio.to_thread`` (limiter, shielded scope, a ``queue.Queue`` and its
  ``Condition``) cost several times either on every effect. Other anyio
  backends use ``anyio.to_thread``.
* A connection and its pool slot are given back only once its statement has
  finished, even when the job is cancelled meanwhile (the job ends at once;
  the next one waits for the slot), so two statements never share a connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import queue
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import anyio
import anyio.to_thread
import orjson

from zerver.core._effects import DbDel, DbGet, DbPut, DbQuery, Effect
from zerver.core._errors import EffectError, UnsupportedEffectError
from zerver.runtime._park import ConcurrencyLimiter, JobContext

if TYPE_CHECKING:
    from zerver.core._clock import Clock

__all__ = ["SqliteInterpreter"]

T = TypeVar("T")

_Work = tuple[Callable[[sqlite3.Connection], Any], Callable[[bool, Any], None]]
"""A statement for a connection thread: ``fn(conn)``, and ``done(ok, value)`` for the loop."""

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_TABLE_RE = re.compile(_IDENT)
# A JSON field may be a dotted path into nested objects: ``author.name``.
_FIELD_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
_MAX_NAME = 128

_TRANSIENT_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
# Pauses between tries of the switch to WAL while another process writes (start-up).
_WAL_RETRY_FIRST_S = 0.005
_WAL_RETRY_MAX_S = 0.05


_CHECKED: set[str] = set()
"""Table names already found valid (checking one again cost a third of the
SQLite interpreter's own time on the loop); bounded by ``_CHECKED_MAX``."""
_CHECKED_MAX = 1024


def _check_table(table: str) -> str:
    if type(table) is str and table in _CHECKED:
        return table
    if (
        not isinstance(table, str)
        or len(table) > _MAX_NAME
        or not _TABLE_RE.fullmatch(table)
        or table.lower().startswith("sqlite_")
    ):
        raise EffectError(
            f"invalid table name {table!r}: use letters, digits and '_' "
            f"(not starting with a digit or 'sqlite_', at most {_MAX_NAME} characters)",
            kind="invalid_table",
            status_hint=500,
        )
    if len(_CHECKED) < _CHECKED_MAX:
        _CHECKED.add(table)
    return table


def _json_path(field: str) -> str:
    if not isinstance(field, str) or len(field) > _MAX_NAME or not _FIELD_RE.fullmatch(field):
        raise EffectError(
            f"invalid field name {field!r}: use identifiers joined by '.'",
            kind="invalid_query",
            status_hint=500,
        )
    return "$." + field


def _sql_scalar(field: str, value: object) -> object:
    """The SQL value ``json_extract`` yields for a JSON scalar equal to ``value``."""
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, str | int | float):
        return value
    raise EffectError(
        f"where[{field!r}] must be a JSON scalar (str, int, float, bool or None), "
        f"got {type(value).__name__}",
        kind="invalid_query",
        status_hint=500,
    )


def _encode(table: str, key: str, value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        raise EffectError(
            f"value for key {key!r} in table {table!r} is not JSON-serialisable: {exc}",
            kind="invalid_value",
            status_hint=500,
        ) from exc


def encode_rows(
    table: str, items: Mapping[str, object] | Iterable[tuple[str, object]]
) -> tuple[str, list[tuple[str, str]]]:
    """``put_many``'s checked table name and its ``(key, JSON text)`` rows, the same
    for every database interpreter."""
    name = _check_table(table)
    pairs = items.items() if isinstance(items, Mapping) else items
    return name, [(key, _encode(name, key, value)) for key, value in pairs]


def _decode(table: str, text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise EffectError(
            f"a value in table {table!r} is not valid JSON: {exc}",
            kind="db_error",
            status_hint=500,
        ) from exc


def _db_error(exc: sqlite3.Error, what: str) -> EffectError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        transient = code & 0xFF in _TRANSIENT_CODES
    else:
        text = str(exc).lower()
        transient = "locked" in text or "busy" in text
    return EffectError(
        f"sqlite error during {what}: {exc}",
        kind="db_error",
        status_hint=500,
        retryable=transient,
    )


def _switch_to_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Put the database file in WAL mode, waiting up to ``timeout_s`` for other writers.

    Switching a fresh file to WAL takes an exclusive lock, and SQLite answers
    ``SQLITE_BUSY`` at once, without its busy handler, while another connection
    holds a write lock: two processes opening one new file (``--workers 2``) would
    otherwise fail at random. Start-up only, so the wait is a plain sleep.
    """
    deadline = time.monotonic() + timeout_s
    pause = _WAL_RETRY_FIRST_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            time.sleep(min(pause, left))
            pause = min(pause * 2, _WAL_RETRY_MAX_S)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Answers:
    """Finished statements on their way back to the event loop: one wake-up of the
    loop carries every answer ready by then."""

    __slots__ = ("loop", "ready", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ready: collections.deque[tuple[Callable[[bool, Any], None], bool, Any]] = (
            collections.deque()
        )
        # True from the wake-up's scheduling until `deliver` starts: a thread that
        # finds it set knows its answer will be seen (deque operations are atomic).
        self.scheduled = False

    def post(self, done: Callable[[bool, Any], None], ok: bool, value: Any) -> None:
        """On a connection thread: queue one answer, waking the loop unless a wake-up is due."""
        self.ready.append((done, ok, value))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        """On the loop: hand every ready answer to its waiter."""
        self.scheduled = False
        ready = self.ready
        try:
            while ready:
                done, ok, value = ready.popleft()
                done(ok, value)
        finally:
            if ready and not self.scheduled:  # a waiter's callback raised: the rest next turn
                self.scheduled = True
                self.loop.call_soon(self.deliver)


class _Outbox:
    """Statements on their way to the connection threads: every statement asked for
    during one turn of the loop is put on the shared queue together, at the start
    of the next turn.

    Put one by one as each job asks, statements reach the queue between the loop's
    other work (reading and writing sockets, which lets go of the GIL), so a woken
    thread and the loop hand the GIL back and forth for every statement; put
    together, a woken thread finds the loop busy only with putting. Under load
    that took the blog route from 7.8 to 2.2 thread switches a request once the
    request's task ran its effect itself (see ``docs/performance.md``).
    """

    __slots__ = ("loop", "pending", "work")

    def __init__(self, loop: asyncio.AbstractEventLoop, work: queue.SimpleQueue[_Work | None]):
        self.loop = loop
        self.work = work
        self.pending: list[_Work] = []

    def put(self, item: _Work) -> None:
        """On the loop: queue one statement for the next turn."""
        pending = self.pending
        pending.append(item)
        if len(pending) == 1:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """On the loop: hand every pending statement to the threads."""
        pending, self.pending = self.pending, []
        put = self.work.put
        for item in pending:
            put(item)

    def close(self, threads: int) -> None:
        """End ``threads`` connection threads, each once the statements asked for
        before (this turn's included) have run."""
        self.flush()
        for _ in range(threads):
            self.work.put(None)


class _ConnectionThread:
    """One pooled connection and the thread that runs statements on it (on asyncio).

    Every thread of a pool takes work from one shared queue, so a thread that has
    just finished takes the next statement without sleeping. ``None`` on the queue
    closes one connection and ends its thread.
    """

    __slots__ = ("answers", "conn", "queue", "thread")

    def __init__(
        self,
        conn: sqlite3.Connection,
        work: queue.SimpleQueue[_Work | None],
        answers: _Answers,
    ) -> None:
        self.conn = conn
        self.queue = work
        self.answers = answers
        self.thread = threading.Thread(target=self._serve, name="zerver-sqlite", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn = self.conn
        get = self.queue.get
        post = self.answers.post
        try:
            while (item := get()) is not None:
                fn, done = item
                try:
                    value, ok = fn(conn), True
                except BaseException as exc:
                    value, ok = exc, False
                try:
                    post(done, ok, value)
                except RuntimeError:  # the loop closed under us: nobody waits any more
                    return
        finally:
            conn.close()


class SqliteInterpreter:
    """Performs ``db`` effects (``DbGet``, ``DbPut``, ``DbDel``, ``DbQuery``) on SQLite.

    ``path`` is a database file (opened in WAL mode) or ``":memory:"``, which
    makes one private in-memory database shared by every pooled connection
    and gone when the interpreter closes. ``pool_size`` bounds the open
    connections and the concurrent queries (:attr:`default_pool_size` unless
    given); ``busy_timeout_ms`` bounds how long a statement, or the switch of a
    new file to WAL at start, waits for another writer's lock before failing with
    a retryable error.

    Connections are opened by :meth:`start` (or on first use) and closed by
    :meth:`aclose`; a later :meth:`start` opens them again.
    """

    system = "db"
    #: It makes no OpenTelemetry spans of its own (see ``Interpreter``).
    otel_spans: ClassVar[bool] = False
    #: Static attributes of every span this interpreter's effects produce.
    span_attributes: ClassVar[dict[str, str]] = {"db.system": "sqlite"}
    #: Connections (and their threads) when no size is given. Each waits for SQLite,
    #: not for the CPU, and a pool smaller than the statements in flight makes
    #: jobs queue in process (``backpressure`` parks) and the threads sleep and wake
    #: for every statement: under 64 concurrent blog requests 4 connections served
    #: ~2 700 req/s, 16 ~3 000, 32 and 64 ~3 400 (docs/performance.md).
    default_pool_size: ClassVar[int] = 32

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        pool_size: int = default_pool_size,
        busy_timeout_ms: int = 5000,
        clock: Clock | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be >= 0, got {busy_timeout_ms}")
        self.path = os.fspath(path)
        self.pool_size = pool_size
        self.busy_timeout_ms = busy_timeout_ms
        # Kept for symmetry with the other interpreters; waits are timed by the job's clock.
        self.clock = clock
        self.limiter = ConcurrencyLimiter("db_pool", pool_size)
        self.in_memory = self.path == ":memory:"
        # Shared-cache connections fail at once with SQLITE_LOCKED instead of
        # waiting on busy_timeout, so in-memory statements take turns.
        self._statement_lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self.in_memory else contextlib.nullcontext()
        )
        self._free: list[sqlite3.Connection] = []
        self._open: list[sqlite3.Connection] = []
        # On asyncio: one thread per connection, fed through the outbox (see the
        # module's rules); None while the pool is closed.
        self._outbox: _Outbox | None = None
        self._threads_open: list[_ConnectionThread] = []
        self._tables: set[str] = set()
        self._started = False
        self._start_lock = anyio.Lock()
        self._threads: anyio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"<SqliteInterpreter {self.path!r} pool={self.pool_size}>"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the connection pool (idempotent)."""
        async with self._start_lock:
            if self._started:
                return
            target, uri = self.path, False
            if self.in_memory:
                target, uri = f"file:zerver-{uuid.uuid4().hex}?mode=memory&cache=shared", True
            conns = await anyio.to_thread.run_sync(self._open_pool, target, uri)
            self._tables = set()
            if _on_asyncio():
                loop = asyncio.get_running_loop()
                answers = _Answers(loop)
                work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
                self._outbox = _Outbox(loop, work)
                self._threads_open = [_ConnectionThread(c, work, answers) for c in conns]
            else:
                self._open = conns
                self._free = list(conns)
                self._threads = anyio.CapacityLimiter(self.pool_size)
            self._started = True

    def _open_pool(self, target: str, uri: bool) -> list[sqlite3.Connection]:
        conns: list[sqlite3.Connection] = []
        try:
            for _ in range(self.pool_size):
                conn = sqlite3.connect(
                    target,
                    uri=uri,
                    check_same_thread=False,
                    isolation_level=None,
                    timeout=self.busy_timeout_ms / 1000,
                )
                conns.append(conn)
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                if not self.in_memory:
                    if len(conns) == 1:
                        _switch_to_wal(conn, self.busy_timeout_ms / 1000)
                    conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            for conn in conns:
                conn.close()
            raise _db_error(exc, f"opening {self.path!r}") from exc
        return conns

    async def aclose(self) -> None:
        """Close every connection. Connections still in use close when returned."""
        self._started = False
        free, self._free, self._open = self._free, [], []
        for conn in free:
            conn.close()
        threads, self._threads_open = self._threads_open, []
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close(len(threads))

    # -- running statements --------------------------------------------------

    async def _run(
        self, job: JobContext | None, what: str, fn: Callable[[sqlite3.Connection], T]
    ) -> T:
        if not self._started:
            await self.start()
        if self._threads_open:
            return await self._run_on_thread(job, what, fn)
        async with self.limiter.slot(job):
            # The limiter admits at most pool_size holders, so a connection is free.
            conn = self._free.pop()
            try:
                if job is None:
                    return await self._call(conn, what, fn)
                with job.parked("io_wait", "sqlite"):
                    return await self._call(conn, what, fn)
            finally:
                if conn in self._open:
                    self._free.append(conn)
                else:
                    conn.close()

    async def _run_on_thread(
        self, job: JobContext | None, what: str, fn: Callable[[sqlite3.Connection], T]
    ) -> T:
        await self.limiter.acquire(job)
        outbox = self._outbox
        if outbox is None:
            # Closed while this job waited for a connection: like any call after
            # `aclose`, it opens the pool again.
            self.limiter.release()
            return await self._run(job, what, fn)
        future: asyncio.Future[T] = outbox.loop.create_future()
        outbox.put((partial(self._in_thread, fn=fn), partial(self._finished, future)))
        try:
            if job is None:
                return await future
            with job.parked("io_wait", "sqlite"):
                return await future
        except sqlite3.Error as exc:
            raise _db_error(exc, what) from exc

    def _finished(self, future: asyncio.Future[Any], ok: bool, value: Any) -> None:
        """On the loop, once a statement has finished: its pool slot goes back first,
        then the job (if it still waits) gets the answer."""
        self.limiter.release()
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def _call(
        self, conn: sqlite3.Connection, what: str, fn: Callable[[sqlite3.Connection], T]
    ) -> T:
        try:
            return await anyio.to_thread.run_sync(self._in_thread, conn, fn, limiter=self._threads)
        except sqlite3.Error as exc:
            raise _db_error(exc, what) from exc

    def _in_thread(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._statement_lock:
            return fn(conn)

    def _ensure_table(self, conn: sqlite3.Connection, table: str) -> None:
        if table in self._tables:
            return
        # Safe to interpolate: the name matched _TABLE_RE.
        conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{table}" (key TEXT PRIMARY KEY, value TEXT NOT NULL)'
        )
        self._tables.add(table)

    # -- effects -------------------------------------------------------------

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        """Perform one ``db`` effect and return its result (see the effect classes)."""
        return await perform_db(self, effect, job)

    async def get(self, table: str, key: str, job: JobContext | None = None) -> Any:
        """The value stored under ``key`` in ``table``, or ``None``."""
        name = _check_table(table)

        def run(conn: sqlite3.Connection) -> str | None:
            self._ensure_table(conn, name)
            row = conn.execute(f'SELECT value FROM "{name}" WHERE key = ?', (key,)).fetchone()
            return None if row is None else str(row[0])

        text = await self._run(job, f"get {key!r} from {name!r}", run)
        return None if text is None else _decode(name, text)

    async def put(self, table: str, key: str, value: object, job: JobContext | None = None) -> None:
        """Store ``value`` under ``key`` in ``table``, replacing any old value."""
        await self.put_many(table, [(key, value)], job)

    async def put_many(
        self,
        table: str,
        items: Mapping[str, object] | Iterable[tuple[str, object]],
        job: JobContext | None = None,
    ) -> int:
        """Store many ``(key, value)`` pairs in one transaction; returns how many.

        Handy for seeding a database at start-up.
        """
        name, rows = encode_rows(table, items)
        if not rows:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            self._ensure_table(conn, name)
            sql = f'INSERT OR REPLACE INTO "{name}" (key, value) VALUES (?, ?)'
            if len(rows) == 1:
                conn.execute(sql, rows[0])
                return 1
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return len(rows)

        return await self._run(job, f"put into {name!r}", run)

    async def delete(self, table: str, key: str, job: JobContext | None = None) -> bool:
        """Delete ``key`` from ``table``; whether a row was deleted."""
        name = _check_table(table)

        def run(conn: sqlite3.Connection) -> bool:
            self._ensure_table(conn, name)
            return conn.execute(f'DELETE FROM "{name}" WHERE key = ?', (key,)).rowcount > 0

        return await self._run(job, f"delete {key!r} from {name!r}", run)

    async def query(
        self,
        table: str,
        where: Mapping[str, object] | None = None,
        *,
        order_by: str | None = None,
        limit: int | None = None,
        job: JobContext | None = None,
    ) -> list[Any]:
        """Values in ``table`` whose JSON fields equal ``where``, ordered and limited.

        ``order_by`` names a field (``-field`` for descending); ties and
        unordered results follow the key.
        """
        name = _check_table(table)
        clauses: list[str] = []
        params: list[object] = []
        for field, value in (where or {}).items():
            path = _json_path(field)
            scalar = _sql_scalar(field, value)
            if scalar is None:
                clauses.append("json_extract(value, ?) IS NULL")
                params.append(path)
            else:
                clauses.append("json_extract(value, ?) = ?")
                params.extend((path, scalar))
        sql = f'SELECT value FROM "{name}"'
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        if order_by:
            descending = order_by.startswith("-")
            params.append(_json_path(order_by.removeprefix("-")))
            sql += f" ORDER BY json_extract(value, ?) {'DESC' if descending else 'ASC'}, key"
        else:
            sql += " ORDER BY key"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise EffectError(
                    f"limit must be an integer >= 0, got {limit!r}",
                    kind="invalid_query",
                    status_hint=500,
                )
            sql += " LIMIT ?"
            params.append(limit)

        def run(conn: sqlite3.Connection) -> list[str]:
            self._ensure_table(conn, name)
            return [str(row[0]) for row in conn.execute(sql, params)]

        texts = await self._run(job, f"query {name!r}", run)
        return [_decode(name, text) for text in texts]


class DbStore(Protocol):
    """What :func:`perform_db` needs of a database interpreter (SQLite's, PostgreSQL's)."""

    async def get(self, table: str, key: str, job: JobContext | None = None) -> Any: ...

    async def put(
        self, table: str, key: str, value: object, job: JobContext | None = None
    ) -> None: ...

    async def delete(self, table: str, key: str, job: JobContext | None = None) -> bool: ...

    async def query(
        self,
        table: str,
        where: Mapping[str, object] | None = None,
        *,
        order_by: str | None = None,
        limit: int | None = None,
        job: JobContext | None = None,
    ) -> list[Any]: ...


async def perform_db(store: DbStore, effect: Effect, job: JobContext) -> Any:
    """Perform one ``db`` effect on ``store`` and note the rows it touched (``db.rows``):
    the one dispatch of the ``db`` effects, whichever database runs them."""
    if isinstance(effect, DbGet):
        value = await store.get(effect.table, effect.key, job)
        job.note("db.rows", 0 if value is None else 1)
        return value
    if isinstance(effect, DbPut):
        await store.put(effect.table, effect.key, effect.value, job)
        job.note("db.rows", 1)
        return None
    if isinstance(effect, DbDel):
        deleted = await store.delete(effect.table, effect.key, job)
        job.note("db.rows", int(deleted))
        return deleted
    if isinstance(effect, DbQuery):
        rows = await store.query(
            effect.table, effect.where, order_by=effect.order_by, limit=effect.limit, job=job
        )
        job.note("db.rows", len(rows))
        return rows
    raise UnsupportedEffectError(type(store).__name__, effect)
