"""The spool: a bounded, persistent FIFO of export payloads on disk, shared by processes.

The export pipeline puts encoded OTLP request bodies (or batches of packed
records) here when the backend is unreachable or the exporter falls behind, and
replays them oldest first later, also after a crash. Callers are background
threads, never a request: the spool may block briefly on disk and SQLite locks.
Modelled on the OpenTelemetry Collector's persistent queue.

Rules:

- Storage is ``<directory>/spool.sqlite3`` in WAL mode with ``synchronous=NORMAL``:
  a killed process loses nothing it committed; a power cut may lose the last
  transactions but never corrupts earlier ones. ``auto_vacuum=INCREMENTAL`` is
  set before the tables exist. One connection per :class:`Spool`, shared by
  its threads under a lock.
- An item is a row of ``items`` (id, kind, count, meta as JSON, created_ns,
  crc32 of the body, owner: NULL while unclaimed) and a row of ``bodies``
  (id, body), written in one transaction. The body has a table of its own
  because SQLite rewrites a whole record on UPDATE: claiming a 1 MiB body in
  the same row wrote 2 MiB of WAL, in its own row 8 KiB. ``secure_delete=FAST``
  (this build defaults to ON) keeps an ack from zeroing the body's pages: 16 KiB
  of WAL instead of 1 MiB; freed pages are reused or vacuumed, not zeroed.
- Order is the rowid (AUTOINCREMENT: never reused). ``claim`` takes the oldest
  unclaimed item inside one ``BEGIN IMMEDIATE`` transaction, so a claim is
  exclusive across threads and processes. ``release`` gives it back with its
  place; ``ack`` deletes it (by id, whoever holds it now). Delivery is
  at-least-once: duplicates may happen, loss may not.
- Quota: ``put`` refuses an item when the pages in use ((page_count -
  freelist_count) * page_size) plus the body would exceed ``max_bytes``, or
  when they do once it is written (then it is rolled back), so the pages in
  use never exceed ``max_bytes``. Freed pages are reused. The WAL is outside
  the quota: it holds the pages written since the last checkpoint (SQLite
  checkpoints every 1000 pages, and trims the file to 4 MiB afterwards). When
  an ack empties a spool that has grown past 1 MiB, free pages are given back
  (``incremental_vacuum``) and the WAL truncated, so an idle spool is small on disk.
- Ownership: each Spool holds an exclusive ``flock`` on
  ``<directory>/owners/<token>.lock`` (token: random 63 bits) while open. A
  claim whose owner's lock file is missing or can be locked belongs to a dead
  process: at open, and at most every 5 s (``wall_ns``) inside ``put`` and
  ``claim``, such claims are released and the lock files deleted. ``close``
  releases the object's own claims; an object dropped unclosed keeps them until
  its process exits. Do not share an open Spool across ``fork``.
- Damage: opening (under an exclusive ``flock`` on ``<directory>/open.lock``,
  so one process at a time checks and recovers) runs ``PRAGMA quick_check``. A
  file that is not a database, fails the check or raises SQLite's corruption
  errors is moved aside (with its -wal and -shm) as
  ``damaged-<UTC time>-<n>.sqlite3``; a fresh database takes its place and
  every row that can still be read and whose crc matches is copied in with its
  id (hence its order). Rows that cannot be read are probed past one rowid at
  a time. One warning says what was found, what was salvaged and where the
  copy is. A corruption error later on reopens the same way; so does finding
  the file replaced by another process's recovery (checked every 5 s; what
  this object wrote to the old file meanwhile stays in the damaged copy). A
  torn WAL tail needs nothing: SQLite ignores it.
- Failure: the constructor raises :class:`~zerver.ConfigError` only when the
  directory or database cannot be created or written (a database locked past
  the busy timeout included), ``ValueError`` for a bad argument. After that
  nothing raises: ``put`` returns False and counts a drop, ``claim`` returns
  None, ``ack``/``release`` log and carry on. Every warning goes through
  :class:`RateLimitedLog`; drops are logged when they happen, with the
  running totals.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType, TracebackType

from zerver.core._errors import ConfigError

from ._log import RateLimitedLog

__all__ = ["Spool", "SpoolItem", "SpoolStats"]

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    count INTEGER NOT NULL,
    meta TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    owner INTEGER
);
CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS items_queue ON items (owner, id, kind);
COMMIT;
"""
_COLUMNS = "id, kind, count, meta, created_ns, crc"
_INSERT = f"INSERT INTO items ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_MAINTAIN_EVERY_NS = 5_000_000_000
_WAL_LIMIT = 4 << 20
_SHRINK_AT = 1 << 20
_MAX_PROBES = 100_000
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolItem:
    """One stored payload, as :meth:`Spool.claim` hands it out."""

    id: int
    """SQLite rowid; increases with insertion order."""
    kind: str
    count: int
    """Caller-defined units (spans, records) for accounting."""
    body: bytes
    meta: Mapping[str, str]
    created_ns: int
    """Wall clock (ns) when put."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolStats:
    """A snapshot of a spool's contents and of one :class:`Spool` object's counters."""

    path: str
    items: int
    """Items stored now, claimed or not (all processes)."""
    count: int
    count_by_kind: Mapping[str, int]
    """``count`` per kind (spans in ``otlp`` items, records in ``records`` items...)."""
    bytes_used: int
    """Pages in use times the page size (the WAL excluded)."""
    max_bytes: int
    written_items: int
    written_count: int
    acked_items: int
    acked_count: int
    dropped_items: int
    """Puts refused: quota full, closed, or a write error."""
    dropped_count: int
    corrupt_items: int
    """Items found damaged and removed (at claim or at salvage)."""
    corrupt_count: int
    """Their ``count`` where it could still be read."""
    salvaged_items: int
    damaged_files: int


# The per-object counters: every field of SpoolStats after max_bytes.
_COUNTERS = tuple(f.name for f in fields(SpoolStats))[6:]


class _FullError(Exception):
    """Raised inside a put's transaction to roll it back."""


class _DamagedError(Exception):
    """The database file is damaged; the message says how."""


def _is_damage(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", -1)
    return isinstance(exc, sqlite3.DatabaseError) and (code & 0xFF) in _DAMAGE_CODES


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


@contextlib.contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        _rollback(db)
        raise
    db.execute("COMMIT")


def _kind_filter(kinds: Collection[str] | None) -> tuple[str, tuple[str, ...]] | None:
    """SQL to add to a WHERE clause and its parameters; None when no kind is wanted."""
    if kinds is None:
        return "", ()
    wanted = (kinds,) if isinstance(kinds, str) else tuple(dict.fromkeys(kinds))
    if not wanted:
        return None
    return f" AND kind IN ({', '.join('?' * len(wanted))})", wanted


def _decode(row: tuple[object, ...] | None, body: object) -> SpoolItem | None:
    """The item, or None when a field has the wrong type, or the meta or the crc is bad."""
    if row is None or not isinstance(body, bytes) or zlib.crc32(body) != row[5]:
        return None
    item_id, kind, count, meta_text, created_ns, _ = row
    try:
        meta = json.loads(meta_text) if isinstance(meta_text, str) else None
    except (ValueError, RecursionError):
        return None
    if not (
        isinstance(item_id, int)
        and isinstance(kind, str)
        and isinstance(count, int)
        and isinstance(created_ns, int)
        and isinstance(meta, dict)
        and all(isinstance(v, str) for v in meta.values())  # JSON keys are str
    ):
        return None
    return SpoolItem(
        id=item_id,
        kind=kind,
        count=count,
        body=body,
        meta=MappingProxyType(meta),
        created_ns=created_ns,
    )


def _scan(src: sqlite3.Connection, sql: str, top: int) -> Iterator[tuple[object, ...]]:
    """The readable rows of ``sql`` (``... WHERE id > ? ORDER BY id``, id first).

    An unreadable row or page stops a scan part-way; it resumes one rowid
    further on, up to ``top`` (a seek past the damaged page succeeds again).
    """
    last = probes = 0
    while True:
        try:
            for row in src.execute(sql, (last,)):
                if isinstance(row[0], int) and row[0] > last:  # else a damaged page's garbage
                    last = row[0]
                    yield row
            return
        except sqlite3.Error:
            last += 1
            probes += 1
            if last >= top or probes > _MAX_PROBES:
                return


def _damaged_items(src: sqlite3.Connection) -> Iterator[tuple[SpoolItem | None, int]]:
    """Every item a damaged file still shows: the item if intact, and its count (or 0)."""
    top = 0
    for sql in (
        "SELECT max(id) FROM items",
        "SELECT max(id) FROM bodies",
        "SELECT seq FROM sqlite_sequence WHERE name = 'items'",
    ):
        with contextlib.suppress(sqlite3.Error):
            row = src.execute(sql).fetchone()
            if row is not None and isinstance(row[0], int):
                top = max(top, row[0])
    seen: set[object] = set()
    for row in _scan(src, f"SELECT {_COLUMNS} FROM items WHERE id > ? ORDER BY id", top):
        seen.add(row[0])
        try:
            body_row: tuple[object] | None = src.execute(
                "SELECT body FROM bodies WHERE id = ?", row[:1]
            ).fetchone()
        except sqlite3.Error:
            body_row = None
        count = row[2] if isinstance(row[2], int) else 0
        yield _decode(row, body_row[0] if body_row else None), count
    # A body whose item row is lost was an item too: unrecoverable, but counted.
    for (body_id,) in _scan(src, "SELECT id FROM bodies WHERE id > ? ORDER BY id", top):
        if body_id not in seen:
            yield None, 0


def _store(db: sqlite3.Connection, row: tuple[int | None, str, int, str, int], body: bytes) -> None:
    """Insert one item; ``row`` is (id or None for the next, kind, count, meta, created_ns)."""
    item_id = db.execute(_INSERT, (*row, zlib.crc32(body))).lastrowid
    db.execute("INSERT INTO bodies (id, body) VALUES (?, ?)", (item_id, body))


def _meta_text(meta: Mapping[str, str]) -> str:
    return json.dumps(dict(meta), separators=(",", ":"), sort_keys=True)


class Spool:
    """A bounded, persistent, multi-process FIFO on disk (see the module's rules).

    Example::

        spool = Spool("/var/spool/myapp", max_bytes=256 << 20)
        spool.put("otlp", body, count=512, meta={"content-type": "application/json"})
        item = spool.claim()
        if item is not None:
            if send(item.body):
                spool.ack(item)
            else:
                spool.release(item)
        spool.close()
    """

    __slots__ = (
        "_busy_timeout_s",
        "_closed",
        "_counts",
        "_db",
        "_dir",
        "_file_id",
        "_fill",
        "_lock",
        "_log",
        "_maintained_ns",
        "_max_bytes",
        "_owner_fd",
        "_page_size",
        "_path",
        "_token",
        "_usage",
        "_wall_ns",
    )

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        log: RateLimitedLog | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        busy_timeout_s: float = 5.0,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        if busy_timeout_s < 0:
            raise ValueError(f"busy_timeout_s must be >= 0, not {busy_timeout_s}")
        self._dir = os.path.abspath(os.fspath(directory))
        self._path = os.path.join(self._dir, "spool.sqlite3")
        self._max_bytes = max_bytes
        self._fill = 0.0
        self._log = log or RateLimitedLog()
        self._wall_ns = wall_ns
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._closed = False
        self._usage: tuple[int, int, dict[str, int], int] = (0, 0, {}, 0)
        self._page_size = 4096
        self._file_id = (0, 0)
        self._maintained_ns = wall_ns()
        try:
            os.makedirs(os.path.join(self._dir, "owners"), exist_ok=True)
            with self._open_lock():
                self._token, self._owner_fd = self._lock_owner()
                try:
                    self._db = self._open_locked()
                except BaseException:
                    self._unlock_owner()
                    raise
        except OSError as exc:
            raise ConfigError(
                f"spool directory {self._dir!r} cannot be created or written: "
                f"[Errno {exc.errno}] {exc.strerror or exc}"
            ) from exc
        except sqlite3.Error as exc:
            raise ConfigError(f"spool database {self._path!r} cannot be opened: {exc}") from exc

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    # -- the queue ----------------------------------------------------------------

    def put(
        self, kind: str, body: bytes, count: int, meta: Mapping[str, str] | None = None
    ) -> bool:
        """Store one item; False (counted as dropped, logged at once via the
        rate-limited log) if it would exceed max_bytes or the write failed."""
        error: str | None = None
        with self._lock:
            if self._closed:
                reason = "closed"
            else:
                try:
                    self._maintain()
                    self._insert(kind, body, count, meta or {})
                except _FullError:
                    reason = "full"
                except Exception as exc:  # a spool failure must not break export
                    reason, error = "write_failed", repr(exc)
                    self._recover_from(exc)
                else:
                    self._add(written_items=1, written_count=count)
                    return True
            self._add(dropped_items=1, dropped_count=count)
            counts = dict(self._counts)
        self._log.warning(
            f"spool_{reason}",
            "spool refused an item; dropped",
            reason=reason,
            error=error,
            kind=kind,
            count=count,
            bytes=len(body),
            max_bytes=self._max_bytes,
            dropped_items=counts["dropped_items"],
            dropped_count=counts["dropped_count"],
        )
        return False

    def claim(self, kinds: Collection[str] | None = None) -> SpoolItem | None:
        """The oldest unclaimed item (of these kinds; all when None), now claimed by
        this Spool object; None if there is none. Items whose checksum does not
        match are deleted, counted as corrupt, logged, and skipped."""
        where = _kind_filter(kinds)
        with self._lock:
            if self._closed or where is None:
                return None
            try:
                self._maintain()
                return self._claim(*where)
            except Exception as exc:  # a spool failure must not break export
                self._failed("claim", exc)
                return None

    def ack(self, item: SpoolItem) -> None:
        """Delete ``item`` for good (it was delivered)."""
        with self._lock:
            try:
                db = self._live_db("ack")
                with _write(db):
                    gone = db.execute("DELETE FROM items WHERE id = ?", (item.id,)).rowcount
                    db.execute("DELETE FROM bodies WHERE id = ?", (item.id,))
                if gone:
                    self._add(acked_items=1, acked_count=item.count)
                    self._shrink_if_empty(db)
            except Exception as exc:  # a spool failure must not break export
                self._failed("ack", exc)

    def release(self, item: SpoolItem) -> None:
        """Give ``item`` back unclaimed; it keeps its place (still oldest first)."""
        with self._lock:
            try:
                self._live_db("release").execute(
                    "UPDATE items SET owner = NULL WHERE id = ? AND owner = ?",
                    (item.id, self._token),
                )
            except Exception as exc:  # a spool failure must not break export
                self._failed("release", exc)

    @property
    def fill(self) -> float:
        """How full the spool was after this object's last write, from 0 to 1
        (known without reading the file; deliveries since then are not counted)."""
        return self._fill

    def pending(self, kinds: Collection[str] | None = None) -> int:
        """Unclaimed items now (of these kinds; all when None)."""
        where = _kind_filter(kinds)
        with self._lock:
            if self._closed or where is None:
                return 0
            sql = f"SELECT count(*) FROM items WHERE owner IS NULL{where[0]}"
            try:
                n: int = self._db.execute(sql, where[1]).fetchone()[0]
            except Exception as exc:  # a spool failure must not break export
                self._failed("pending", exc)
                return 0
            return n

    def statistics(self) -> SpoolStats:
        """What is stored (after close: as it was at close) and what this object did."""
        with self._lock:
            return self._snapshot(refresh=not self._closed)

    def close(self) -> None:
        """Give this object's claims back, close the database, drop the owner lock.
        Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.execute("UPDATE items SET owner = NULL WHERE owner = ?", (self._token,))
            except Exception as exc:  # close never raises
                self._failed("close", exc)
            self._snapshot(refresh=True)  # the contents statistics() shows from now on
            with contextlib.suppress(Exception):
                self._db.close()
            self._unlock_owner()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- under self._lock -----------------------------------------------------------

    def _live_db(self, op: str) -> sqlite3.Connection:
        if self._closed:
            raise sqlite3.ProgrammingError(f"{op} after close: the spool is closed")
        return self._db

    def _insert(self, kind: str, body: bytes, count: int, meta: Mapping[str, str]) -> None:
        db = self._db
        with _write(db):
            if self._used(db) + len(body) > self._max_bytes:
                self._fill = 1.0
                raise _FullError
            _store(db, (None, kind, count, _meta_text(meta), self._wall_ns()), body)
            used = self._used(db)
            self._fill = min(1.0, used / self._max_bytes)
            if used > self._max_bytes:
                raise _FullError

    def _claim(self, where: str, kinds: tuple[str, ...]) -> SpoolItem | None:
        db = self._db
        oldest = f"SELECT id FROM items WHERE owner IS NULL{where} ORDER BY id LIMIT 1"
        with _write(db):
            while (row := db.execute(oldest, kinds).fetchone()) is not None:
                item_id: int = row[0]
                try:
                    fields = db.execute(f"SELECT {_COLUMNS} FROM items WHERE id = ?", (item_id,))
                    record: tuple[object, ...] | None = fields.fetchone()
                    body = db.execute("SELECT body FROM bodies WHERE id = ?", (item_id,))
                    body_row: tuple[object] | None = body.fetchone()
                except sqlite3.DatabaseError as exc:
                    if not _is_damage(exc):
                        raise
                    record = body_row = None
                item = _decode(record, body_row[0] if body_row else None)
                if item is not None:
                    db.execute("UPDATE items SET owner = ? WHERE id = ?", (self._token, item_id))
                    return item
                db.execute("DELETE FROM items WHERE id = ?", (item_id,))
                db.execute("DELETE FROM bodies WHERE id = ?", (item_id,))
                count = record[2] if record and isinstance(record[2], int) else 0
                self._add(corrupt_items=1, corrupt_count=count)
                self._log.warning(
                    "spool_corrupt",
                    "spool item damaged (checksum or fields); deleted",
                    id=item_id,
                    count=count,
                    corrupt_items=self._counts["corrupt_items"],
                )
        return None

    def _shrink_if_empty(self, db: sqlite3.Connection) -> None:
        """Give an emptied spool's space back, once it has grown past a few MiB (not
        on every emptying: items flowing through one at a time would checkpoint, and
        so fsync, on each ack)."""
        pages: int = db.execute("PRAGMA page_count").fetchone()[0]
        if pages * self._page_size < _SHRINK_AT:
            return
        if db.execute("SELECT 1 FROM items LIMIT 1").fetchone() is None:
            db.executescript("PRAGMA incremental_vacuum;")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _used(self, db: sqlite3.Connection) -> int:
        pages: int = db.execute("PRAGMA page_count").fetchone()[0]
        free: int = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def _add(self, **deltas: int) -> None:
        for name, n in deltas.items():
            self._counts[name] += n

    def _snapshot(self, *, refresh: bool) -> SpoolStats:
        if refresh:
            try:
                rows = self._db.execute(
                    "SELECT kind, count(*), coalesce(sum(count), 0) FROM items GROUP BY kind"
                ).fetchall()
                self._usage = (
                    sum(r[1] for r in rows),
                    sum(r[2] for r in rows),
                    {r[0]: r[2] for r in rows},
                    self._used(self._db),
                )
            except Exception as exc:  # statistics never raise; keep the last known values
                self._failed("statistics", exc)
        items, count, by_kind, used = self._usage
        return SpoolStats(
            path=self._path,
            items=items,
            count=count,
            count_by_kind=dict(by_kind),
            bytes_used=used,
            max_bytes=self._max_bytes,
            **self._counts,
        )

    def _failed(self, op: str, exc: BaseException) -> None:
        self._log.warning(
            f"spool_{op}_failed", f"spool {op} failed", path=self._path, error=repr(exc)
        )
        self._recover_from(exc)

    def _recover_from(self, exc: BaseException) -> None:
        if _is_damage(exc) and not self._closed:
            with contextlib.suppress(Exception):  # logged already; retried on the next damage
                self._reopen()

    def _maintain(self) -> None:
        """Every few seconds: follow a recovery by another process; free dead owners' claims."""
        now = self._wall_ns()
        if 0 <= now - self._maintained_ns < _MAINTAIN_EVERY_NS:
            return
        self._maintained_ns = now
        try:
            st = os.stat(self._path)
            replaced = (st.st_dev, st.st_ino) != self._file_id
        except FileNotFoundError:
            replaced = True
        if replaced:
            self._reopen()
        self._release_dead(self._db)

    def _reopen(self) -> None:
        with self._open_lock():
            db = self._open_locked()
        old, self._db = self._db, db
        with contextlib.suppress(sqlite3.Error):
            old.close()

    # -- opening, ownership and salvage ------------------------------------------------

    @contextlib.contextmanager
    def _open_lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self._dir, "open.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for one open: bounded by the busy timeout
            yield
        finally:
            os.close(fd)

    def _owner_path(self, token: object) -> str:
        return os.path.join(self._dir, "owners", f"{token}.lock")

    def _lock_owner(self) -> tuple[int, int]:
        while True:
            token = secrets.randbits(63)
            fd = os.open(self._owner_path(token), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live owner drew the same token
                os.close(fd)
                continue
            return token, fd

    def _unlock_owner(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._owner_path(self._token))
        with contextlib.suppress(OSError):
            os.close(self._owner_fd)

    def _owner_dead(self, token: object) -> bool:
        """True if no live Spool holds ``token``'s lock file (deleting the file then)."""
        path = self._owner_path(token)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return True
        finally:
            os.close(fd)

    def _release_dead(self, db: sqlite3.Connection) -> None:
        owners = [
            r[0] for r in db.execute("SELECT DISTINCT owner FROM items WHERE owner IS NOT NULL")
        ]
        released = 0
        for owner in owners:
            if owner != self._token and self._owner_dead(owner):
                sql = "UPDATE items SET owner = NULL WHERE owner = ?"
                released += db.execute(sql, (owner,)).rowcount
        if released:
            self._log.warning(
                "spool_dead_owner",
                "spool released the claims of a dead process; they will be delivered again",
                path=self._path,
                released=released,
            )

    def _open_locked(self) -> sqlite3.Connection:
        """Open the database (recovering it if damaged); the caller holds the open lock."""
        try:
            db = self._connect(check=True)
        except _DamagedError as exc:
            damaged = self._move_aside()
            db = self._connect(check=False)
            self._salvage(damaged, db, str(exc))
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        st = os.stat(self._path)
        self._file_id = (st.st_dev, st.st_ino)
        self._release_dead(db)
        for name in os.listdir(os.path.join(self._dir, "owners")):
            token = name.removesuffix(".lock")
            if token != str(self._token) and token.isdigit():
                self._owner_dead(token)  # a dead process's lock file: deleted
        return db

    def _connect(self, *, check: bool) -> sqlite3.Connection:
        db = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # effective before the first table only
            if db.execute("PRAGMA journal_mode = WAL").fetchone() != ("wal",):
                self._log.warning(
                    "spool_no_wal", "spool file system refused WAL mode", path=self._path
                )
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA secure_delete = FAST")  # an ack must not rewrite the body
            db.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}").fetchall()
            if check:
                rows = db.execute("PRAGMA quick_check(5)").fetchall()
                if rows != [("ok",)]:
                    raise _DamagedError("; ".join(str(r[0]) for r in rows))
            db.executescript(_SCHEMA)
        except BaseException as exc:
            db.close()
            if check and _is_damage(exc):
                raise _DamagedError(str(exc)) from exc
            raise
        return db

    def _move_aside(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall_ns() // 1_000_000_000))
        n = 1
        while os.path.exists(target := os.path.join(self._dir, f"damaged-{stamp}-{n}.sqlite3")):
            n += 1
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._path + suffix, target + suffix)
        self._add(damaged_files=1)
        return target

    def _salvage(self, damaged: str, db: sqlite3.Connection, problem: str) -> None:
        """Copy every readable item with a matching crc from ``damaged`` into ``db``."""
        salvaged = corrupt = corrupt_count = 0
        error = None
        try:
            src = sqlite3.connect(Path(damaged).as_uri() + "?mode=ro", uri=True)
            try:
                # Accept a file shorter than its header says (else every read is "malformed").
                src.execute("PRAGMA writable_schema = ON")
                with _write(db):
                    for item, count in _damaged_items(src):
                        if item is None:
                            corrupt += 1
                            corrupt_count += count
                        else:
                            row = (
                                item.id,
                                item.kind,
                                count,
                                _meta_text(item.meta),
                                item.created_ns,
                            )
                            _store(db, row, item.body)
                            salvaged += 1
            finally:
                src.close()
        except sqlite3.Error as exc:  # unopenable, or the fresh database refused the copy
            error, salvaged = repr(exc), 0
        for sidecar in ("-shm", "-wal"):  # the index is rebuilt on demand; an empty log is noise
            with contextlib.suppress(OSError):
                if sidecar == "-shm" or os.path.getsize(damaged + sidecar) == 0:
                    os.unlink(damaged + sidecar)
        self._add(salvaged_items=salvaged, corrupt_items=corrupt, corrupt_count=corrupt_count)
        self._log.warning(
            "spool_damaged",
            "spool database damaged: moved aside, intact items salvaged into a fresh one",
            path=self._path,
            problem=problem,
            damaged_copy=damaged,
            salvaged_items=salvaged,
            corrupt_items=corrupt,
            error=error,
        )
