"""The PostgreSQL interpreter: the ``db`` effects on a shared PostgreSQL server.

Tables and rows are SQLite's (see :mod:`._sqlite`): each table is a namespace
of JSON documents keyed by a string::

    CREATE TABLE IF NOT EXISTS "<table>" (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL)

created on first use, the value stored as the same JSON text. Queries read its
fields through ``value::jsonb`` and mirror SQLite's ``json_extract`` results:
``None`` matches a missing field or JSON ``null``, ``True`` matches ``true``
and ``1``, and ordering puts nulls first, then numbers, then strings (in byte
order), ties broken by the key in byte order. Table and field names are
validated exactly as for SQLite; every value travels as a bound parameter,
and each statement's text (``$1`` placeholders, never values) is reported
for the effect's span.

Rules this module keeps:

* A job first takes a slot of a :class:`~zerver.runtime._park.ConcurrencyLimiter`
  named ``db_pool`` (``pool_size`` slots), so a job that finds every
  connection busy parks with cause ``backpressure`` and the occupancy seen
  when it began to wait. The slot then gets an open connection, or opens
  one: there are never more than ``pool_size``.
* The statement runs inside an ``io_wait`` park episode with token
  ``postgresql``, in a task of its own that gives the connection and the slot
  back when the statement ends. A job that is cancelled (its effect's
  timeout) ends at once; its statement is cancelled on the server in the
  background (psycopg sends a cancel request, bounded to a few seconds) and
  that connection is closed, never reused.
* A connection that failed (the server went away, restarted, or ended the
  session) is closed, not put back, and the next job opens a new one: while
  the server is down each effect fails at once with ``db_unavailable``
  (retryable), and the first effect after it is back succeeds.
* The URL's password never appears in a message, a log line or a span: the
  span says ``server.address``, ``server.port`` and ``db.namespace`` (the
  database), messages name the URL masked.

Why not ``psycopg_pool.AsyncConnectionPool``: its ``getconn`` waits inside
the pool, so a waiting job could not be recorded with the occupancy at the
moment it began to wait; and while the server is down it waits for its own
background reconnection until its timeout instead of failing the effect at
once. The project's limiter over a list of connections gives both.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit

from zerver._config import mask_url
from zerver.core._effects import Effect
from zerver.core._errors import ConfigError, EffectError
from zerver.runtime._park import ConcurrencyLimiter, JobContext

from ._sqlite import _check_table, _decode, _json_path, encode_rows, perform_db

if TYPE_CHECKING:
    import psycopg

    from zerver.core._clock import Clock

__all__ = [
    "PostgresInterpreter",
    "delete_statement",
    "get_statement",
    "probe_postgres",
    "put_statement",
    "query_statement",
]

T = TypeVar("T")

Statement = Callable[["psycopg.AsyncConnection[Any]"], Awaitable[T]]

_CONNECT_TIMEOUT_S = 10
# psycopg waits up to 5 s for a cancel request, then 5 s for the statement to stop.
_CANCEL_WAIT_S = 11
#: How long ``zerver run``/``zerver demo`` wait for the server at start-up.
PROBE_TIMEOUT_S = 5

_SPACES = re.compile(r"\s*\n\s*")


def _one_line(text: str) -> str:
    return _SPACES.sub(" / ", str(text).strip())


def _db_error(exc: Exception, what: str, where: str) -> EffectError:
    """The effect failure for a driver error: ``error.type`` is its ``kind``."""
    from psycopg import errors

    text = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, errors.IntegrityError):
        return EffectError(
            f"postgresql constraint violated during {what}: {text}",
            kind="db_constraint",
            status_hint=500,
        )
    if isinstance(exc, errors.QueryCanceled):  # statement_timeout, or cancelled
        return EffectError(
            f"postgresql statement cancelled during {what}: {text}",
            kind="db_timeout",
            status_hint=504,
            retryable=True,
        )
    if isinstance(
        exc,
        errors.SerializationFailure
        | errors.DeadlockDetected
        | errors.LockNotAvailable
        | errors.UndefinedTable,  # dropped behind its back: the next attempt creates it
    ):
        return EffectError(
            f"postgresql error during {what}: {text}",
            kind="db_error",
            status_hint=500,
            retryable=True,
        )
    if isinstance(exc, errors.OperationalError | errors.InterfaceError):
        # Connection refused or lost, the server shutting down, too many clients.
        return EffectError(
            f"postgresql at {where} unavailable during {what}: {text}",
            kind="db_unavailable",
            status_hint=503,
            retryable=True,
        )
    return EffectError(
        f"postgresql error during {what}: {text}",
        kind="db_error",
        status_hint=500,
    )


def _path(field: str) -> list[str]:
    """``author.name`` as the ``text[]`` path of ``#>``, after the SQLite check of the name."""
    _json_path(field)
    return field.split(".")


def _alternatives(field: str, value: object) -> list[object]:
    """The JSON scalars SQLite's ``json_extract(...) = ?`` matches for ``value``
    (there JSON ``true`` reads as 1: ``True`` matches ``true`` and ``1``)."""
    if isinstance(value, bool):
        return [value, int(value)]
    if isinstance(value, int | float):
        return [value, bool(value)] if value in (0, 1) else [value]
    if isinstance(value, str):
        return [value]
    raise EffectError(
        f"where[{field!r}] must be a JSON scalar (str, int, float, bool or None), "
        f"got {type(value).__name__}",
        kind="invalid_query",
        status_hint=500,
    )


def _sort_keys(param: int, descending: bool) -> str:
    """ORDER BY terms for one JSON field ordered as SQLite orders ``json_extract``:
    null (or missing) < numbers (booleans as 0 and 1) < text, in byte order."""
    x = f"(value::jsonb #> ${param})"
    way = " DESC" if descending else ""
    kind = f"jsonb_typeof({x})"
    rank = (
        f"CASE {kind} WHEN 'number' THEN 1 WHEN 'boolean' THEN 1 "
        f"WHEN 'string' THEN 2 WHEN 'object' THEN 2 WHEN 'array' THEN 2 ELSE 0 END"
    )
    number = (
        f"CASE {kind} WHEN 'number' THEN {x}::numeric WHEN 'boolean' THEN {x}::boolean::int END"
    )
    text = f"CASE {kind} WHEN 'string' THEN {x} #>> '{{}}' ELSE {x}::text END COLLATE \"C\""
    return f"{rank}{way}, {number}{way}, {text}{way}"


def get_statement(table: str) -> str:
    """The statement of ``DbGet`` on ``table`` (a checked name); ``$1`` is the key."""
    return f'SELECT value FROM "{table}" WHERE key = $1'


def put_statement(table: str) -> str:
    """The statement of ``DbPut``: ``$1`` the key, ``$2`` the JSON text."""
    return (
        f'INSERT INTO "{table}" (key, value) VALUES ($1, $2) '
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
    )


def delete_statement(table: str) -> str:
    """The statement of ``DbDel``; ``$1`` is the key."""
    return f'DELETE FROM "{table}" WHERE key = $1'


def query_statement(
    name: str,
    where: Mapping[str, object] | None = None,
    *,
    order_by: str | None = None,
    limit: int | None = None,
) -> tuple[str, list[object]]:
    """The statement of ``DbQuery`` on ``name`` (a checked table name) and its parameters.

    Field names are checked as for SQLite; values become parameters only.
    """
    from psycopg.types.json import Jsonb

    clauses: list[str] = []
    params: list[object] = []
    for field, value in (where or {}).items():
        params.append(_path(field))
        x = f"(value::jsonb #> ${len(params)})"
        if value is None:
            clauses.append(f"COALESCE({x}, 'null'::jsonb) = 'null'::jsonb")
            continue
        marks = []
        for alternative in _alternatives(field, value):
            params.append(Jsonb(alternative))
            marks.append(f"${len(params)}")
        clauses.append(f"{x} = {marks[0]}" if len(marks) == 1 else f"{x} IN ({', '.join(marks)})")
    sql = f'SELECT value FROM "{name}"'
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    if order_by:
        descending = order_by.startswith("-")
        params.append(_path(order_by.removeprefix("-")))
        sql += f" ORDER BY {_sort_keys(len(params), descending)}, key"
    else:
        sql += " ORDER BY key"
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise EffectError(
                f"limit must be an integer >= 0, got {limit!r}",
                kind="invalid_query",
                status_hint=500,
            )
        params.append(limit)
        sql += f" LIMIT ${len(params)}"
    return sql, params


class _Target:
    """What the URL names, for span attributes and messages (never the password)."""

    __slots__ = ("address", "database", "masked", "port")

    def __init__(self, url: str) -> None:
        self.masked = mask_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(f"not a postgresql:// URL: {self.masked!r}") from None
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"not a postgresql:// URL: {self.masked!r}")
        self.address = parts.hostname or "localhost"
        self.port = port or 5432
        self.database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "")


class PostgresInterpreter:
    """Performs ``db`` effects (``DbGet``, ``DbPut``, ``DbDel``, ``DbQuery``) on PostgreSQL.

    ``url`` is a ``postgresql://user:password@host:port/dbname`` URL (libpq's
    query parameters such as ``sslmode`` are honoured). ``pool_size`` bounds
    the open connections and the concurrent statements. Results are those of
    :class:`~zerver.runtime.interpreters.SqliteInterpreter`, on the same tables.

    Nothing connects until the first statement (or :meth:`start`, which only
    prepares); :meth:`aclose` closes the connections, and a later statement
    opens them again. Needs the asyncio event loop (psycopg's async driver).
    """

    system = "db"
    #: It makes no OpenTelemetry spans of its own (see ``Interpreter``).
    otel_spans: ClassVar[bool] = False
    #: Connections when no size is given: each is a server process of PostgreSQL,
    #: whose ``max_connections`` (100 by default) every worker process shares.
    default_pool_size: ClassVar[int] = 4

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = default_pool_size,
        connect_timeout_s: int = _CONNECT_TIMEOUT_S,
        clock: Clock | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if connect_timeout_s < 1:
            raise ValueError(f"connect_timeout_s must be >= 1, got {connect_timeout_s}")
        if importlib.util.find_spec("psycopg") is None:
            raise ConfigError(
                f"ZER_VER_DB_URL={mask_url(url)!r} needs the PostgreSQL driver: "
                "pip install 'zerver[postgres]'"
            )
        self._url = url
        self._target = _Target(url)
        self._conninfo: str | None = None
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        # Kept for symmetry with the other interpreters; waits are timed by the job's clock.
        self.clock = clock
        self.limiter = ConcurrencyLimiter("db_pool", pool_size)
        #: Static attributes of every span this interpreter's effects produce.
        self.span_attributes: dict[str, str | int] = {
            "db.system.name": "postgresql",
            "db.system": "postgresql",
            "db.namespace": self._target.database,
            "server.address": self._target.address,
            "server.port": self._target.port,
        }
        if not self._target.database:  # libpq's default, not known here
            del self.span_attributes["db.namespace"]
        self._free: list[psycopg.AsyncConnection[Any]] = []
        self._open: set[psycopg.AsyncConnection[Any]] = set()
        self._tables: set[str] = set()
        # Statements whose job was cancelled finish here; kept so they are not collected.
        self._running: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<PostgresInterpreter {self._target.masked!r} pool={self.pool_size}>"

    @property
    def url(self) -> str:
        """The database URL with its password masked."""
        return self._target.masked

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Nothing to do: connections open with the first statements."""

    async def aclose(self) -> None:
        """Close every idle connection; those in use close when their statement ends,
        which it waits for (statements of cancelled jobs: at most a few seconds)."""
        free, self._free = self._free, []
        self._open.clear()
        self._tables = set()
        for conn in free:
            await conn.close()
        if self._running:
            await asyncio.wait(set(self._running), timeout=_CANCEL_WAIT_S)

    # -- running statements --------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        import psycopg
        from psycopg.conninfo import make_conninfo

        if self._conninfo is None:
            # How the server lists the connections (pg_stat_activity), unless the URL says.
            named = "application_name=" in self._url
            self._conninfo = make_conninfo(
                self._url, **({} if named else {"application_name": "zerver"})
            )
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=self.connect_timeout_s,
            cursor_factory=psycopg.AsyncRawCursor,
        )
        self._open.add(conn)
        return conn

    async def _run(self, job: JobContext | None, what: str, statement: Statement[T]) -> T:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise EffectError(
                "the PostgreSQL interpreter needs the asyncio event loop",
                kind="db_error",
                status_hint=500,
            ) from None
        await self.limiter.acquire(job)
        # From here the task owns the slot and gives it back when the statement ends.
        task = loop.create_task(self._in_slot(what, statement))
        self._running.add(task)
        task.add_done_callback(self._forget)
        try:
            if job is None:
                return await asyncio.shield(task)
            with job.parked("io_wait", "postgresql"):
                return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()  # the driver cancels the statement on the server
            raise

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # seen by the job, or by nobody once it was cancelled

    async def _in_slot(self, what: str, statement: Statement[T]) -> T:
        import psycopg

        conn: psycopg.AsyncConnection[Any] | None = None
        reusable = False
        try:
            conn = self._free.pop() if self._free else await self._connect()
            result = await statement(conn)
            reusable = True
            return result
        except psycopg.Error as exc:
            reusable = conn is not None and not conn.broken
            if isinstance(exc, psycopg.errors.UndefinedTable):
                self._tables = set()  # dropped behind our back: create again next time
            raise _db_error(exc, what, self._target.masked) from exc
        finally:
            if conn is not None:
                idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if reusable and idle and not conn.closed and conn in self._open:
                    self._free.append(conn)
                else:
                    self._open.discard(conn)
                    await conn.close()
            self.limiter.release()

    async def _ensure_table(self, conn: psycopg.AsyncConnection[Any], table: str) -> None:
        from psycopg import errors

        if table in self._tables:
            return
        # Safe to interpolate: the name matched the table pattern.
        # Another process may create it at the same moment: then it exists.
        # (PostgreSQL reports that race as any of these three.)
        with contextlib.suppress(
            errors.UniqueViolation, errors.DuplicateTable, errors.DuplicateObject
        ):
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{table}" '
                '(key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL)'
            )
        self._tables.add(table)

    @staticmethod
    def _note(job: JobContext | None, table: str, operation: str, sql: str) -> None:
        if job is not None:
            job.note("db.collection.name", table)
            job.note("db.operation.name", operation)
            job.note("db.query.text", sql)

    # -- effects -------------------------------------------------------------

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        """Perform one ``db`` effect and return its result (see the effect classes)."""
        return await perform_db(self, effect, job)

    async def get(self, table: str, key: str, job: JobContext | None = None) -> Any:
        """The value stored under ``key`` in ``table``, or ``None``."""
        name = _check_table(table)
        sql = get_statement(name)
        self._note(job, name, "SELECT", sql)

        async def run(conn: psycopg.AsyncConnection[Any]) -> str | None:
            await self._ensure_table(conn, name)
            cur = await conn.execute(sql, (key,))
            row = await cur.fetchone()
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
        sql = put_statement(name)
        self._note(job, name, "INSERT", sql)

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            await self._ensure_table(conn, name)
            if len(rows) == 1:
                await conn.execute(sql, rows[0])
                return 1
            async with conn.transaction():
                await conn.cursor().executemany(sql, rows)
            return len(rows)

        return await self._run(job, f"put into {name!r}", run)

    async def delete(self, table: str, key: str, job: JobContext | None = None) -> bool:
        """Delete ``key`` from ``table``; whether a row was deleted."""
        name = _check_table(table)
        sql = delete_statement(name)
        self._note(job, name, "DELETE", sql)

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool:
            await self._ensure_table(conn, name)
            cur = await conn.execute(sql, (key,))
            return cur.rowcount > 0

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
        sql, params = query_statement(name, where, order_by=order_by, limit=limit)
        self._note(job, name, "SELECT", sql)

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[str]:
            await self._ensure_table(conn, name)
            cur = await conn.execute(sql, params)
            return [str(row[0]) for row in await cur.fetchall()]

        texts = await self._run(job, f"query {name!r}", run)
        return [_decode(name, text) for text in texts]


def probe_postgres(url: str, timeout_s: int = PROBE_TIMEOUT_S) -> None:
    """Connect once to ``url`` and close; :class:`~zerver.EffectError` (``db_unavailable``)
    naming the URL, password masked, when the server cannot be reached in ``timeout_s``.

    ``zerver run`` and ``zerver demo`` call it before serving, so a wrong URL or
    a server that is down stops start-up with one line instead of failing
    every request.
    """
    import psycopg

    masked = mask_url(url)
    try:
        with psycopg.connect(url, connect_timeout=max(timeout_s, 1)):
            pass
    except psycopg.Error as exc:
        raise EffectError(
            f"cannot reach the database at {masked}: {_one_line(str(exc))}",
            kind="db_unavailable",
            status_hint=503,
            retryable=True,
        ) from None
