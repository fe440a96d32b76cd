from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zerver.core._errors import ConfigError
from zerver.export._log import RateLimitedLog
from zerver.export._spool import Spool, SpoolItem

MB = 1 << 20


def body_of(i: int, size: int = 1000) -> bytes:
    """A body that says which item it is, all through (so damage anywhere shows)."""
    unit = b"item-%05d|" % i
    return (unit * (size // len(unit) + 1))[:size]


def fill(spool: Spool, n: int, *, size: int = 1000) -> None:
    for i in range(n):
        kind = ("otlp", "records")[i % 2]
        assert spool.put(kind, body_of(i, size), i, {"i": str(i)})


def drain(spool: Spool) -> list[SpoolItem]:
    items = []
    while (item := spool.claim()) is not None:
        items.append(item)
        spool.ack(item)
    return items


def intact(items: list[SpoolItem], size: int = 1000) -> bool:
    return all(item.body == body_of(int(item.meta["i"]), size) for item in items)


class Clock:
    def __init__(self) -> None:
        self.ns = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


# -- queue semantics -------------------------------------------------------------------


def test_fifo_across_kinds_and_with_a_kinds_filter(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=MB) as spool:
        fill(spool, 6)
        assert spool.pending() == 6
        assert spool.pending(["otlp"]) == 3
        assert spool.pending("records") == 3  # a bare str is one kind, not its letters
        assert spool.pending([]) == 0
        first = spool.claim(["records", "other"])
        assert first is not None
        assert (first.kind, first.count, dict(first.meta)) == ("records", 1, {"i": "1"})
        assert first.body == body_of(1)
        assert spool.claim([]) is None
        rest = drain(spool)
        assert [int(item.meta["i"]) for item in rest] == [0, 2, 3, 4, 5]
        assert [item.id for item in rest] == sorted(item.id for item in rest)
        assert spool.claim() is None


def test_claim_ack_release(tmp_path: Path) -> None:
    clock = Clock()
    with Spool(tmp_path, max_bytes=MB, wall_ns=clock) as spool:
        fill(spool, 3)
        a = spool.claim()
        b = spool.claim()
        assert a is not None and b is not None
        assert a.created_ns == clock.ns
        assert spool.pending() == 1
        spool.release(a)
        assert spool.pending() == 2
        again = spool.claim()
        assert again == a  # released: still the oldest
        spool.ack(b)
        spool.ack(again)
        spool.ack(again)  # twice: nothing more happens
        stats = spool.statistics()
        assert (stats.items, stats.count, stats.acked_items, stats.acked_count) == (1, 2, 2, 1)
        assert (stats.written_items, stats.written_count) == (3, 3)


def test_quota_refusal_is_counted_logged_and_lifted_by_an_ack(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=128 * 1024, log=RateLimitedLog()) as spool:
        n = 0
        with structlog.testing.capture_logs() as logs:
            while spool.put("otlp", body_of(n, 8000), 10):
                n += 1
            assert not spool.put("otlp", b"x" * (200 * 1024), 7)  # larger than the quota
        assert 5 < n < 16
        stats = spool.statistics()
        assert (stats.dropped_items, stats.dropped_count) == (2, 17)
        assert stats.bytes_used <= stats.max_bytes
        assert logs[0]["reason"] == "full"
        assert logs[0]["dropped_items"] == 1  # the running total, logged at once
        item = spool.claim()
        assert item is not None
        spool.ack(item)
        assert spool.put("otlp", body_of(n, 8000), 10)
        assert spool.statistics().bytes_used <= 128 * 1024


def test_items_persist_across_close_and_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "b", max_bytes=MB)
    fill(spool, 4)
    claimed = spool.claim()
    assert claimed is not None
    spool.close()
    spool.close()  # idempotent
    assert not spool.put("otlp", b"late", 1)
    assert spool.claim() is None
    assert spool.pending() == 0
    spool.ack(claimed)  # logged, not raised
    stats = spool.statistics()  # the contents as at close, the counters as now
    assert (stats.items, stats.count, stats.written_items, stats.dropped_items) == (4, 6, 4, 1)
    with Spool(tmp_path / "a" / "b", max_bytes=MB) as again:
        items = drain(again)
    assert items[0] == claimed  # close gave the claim back; same id, meta, created_ns
    assert [int(i.meta["i"]) for i in items] == [0, 1, 2, 3]
    assert intact(items)


def test_an_emptied_spool_gives_its_space_back(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=16 * MB) as spool:
        fill(spool, 200, size=20_000)
        full = os.path.getsize(spool.path) + os.path.getsize(spool.path + "-wal")
        assert full > 4 * MB
        drain(spool)
        assert spool.statistics().items == 0
        assert os.path.getsize(spool.path + "-wal") == 0
        assert os.path.getsize(spool.path) <= 64 * 1024
        assert spool.statistics().bytes_used <= 64 * 1024


def test_a_write_failure_is_a_counted_drop(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=64 * MB) as spool:
        fill(spool, 2)
        # Test hook: make the file unable to grow, as a full disk would.
        pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
        spool._db.execute(f"PRAGMA max_page_count = {pages}")
        with structlog.testing.capture_logs() as logs:
            assert not spool.put("otlp", body_of(9, 50_000), 5)
        stats = spool.statistics()
        assert (stats.written_items, stats.dropped_items, stats.dropped_count) == (2, 1, 5)
        assert logs[0]["reason"] == "write_failed"
        assert "full" in logs[0]["error"]
        assert [int(i.meta["i"]) for i in drain(spool)] == [0, 1]


def test_a_directory_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"file/spool.*Not a directory"):
        Spool(tmp_path / "file" / "spool", max_bytes=MB)


# -- several Spool objects, threads and processes ------------------------------------------


def test_two_spools_on_one_directory_never_claim_the_same_item(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=MB) as a, Spool(tmp_path, max_bytes=MB) as b:
        fill(a, 4)
        x, y = a.claim(), b.claim()
        assert x is not None and y is not None and x.id != y.id
        assert b.pending() == 2
        a.close()  # a's claim goes back, b's stays
        z = b.claim()
        assert z == x
        assert b.pending() == 2


@pytest.mark.parametrize("shared", [False, True], ids=["two-spools", "one-spool"])
def test_threads_hammering_claim_and_ack_share_the_items(tmp_path: Path, shared: bool) -> None:
    first = Spool(tmp_path, max_bytes=16 * MB)
    second = first if shared else Spool(tmp_path, max_bytes=16 * MB)
    fill(first, 300, size=200)
    got: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def work(spool: Spool, out: list[int]) -> None:
        start.wait(10)
        for _ in range(200):  # bounded, and too few for one thread alone
            item = spool.claim()
            if item is None:
                return
            out.append(item.id)
            spool.ack(item)

    threads = [
        threading.Thread(target=work, args=(s, out))
        for s, out in zip((first, second), got, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ids = got[0] + got[1]
    assert len(ids) == len(set(ids)) == 300
    assert (
        first.statistics().acked_items + (0 if shared else second.statistics().acked_items) == 300
    )
    first.close()
    second.close()


CHILD = textwrap.dedent(
    """
    import sys
    from zerver.export._spool import Spool

    spool = Spool(sys.argv[1], max_bytes=1 << 30)
    if sys.argv[2] == "claim":
        item = spool.claim()
        print(item.id, flush=True)
        sys.stdin.read()  # until killed
    else:
        for i in range(1_000_000):
            unit = b"item-%05d|" % i
            spool.put("otlp", (unit * 91)[:1000], 1, {"i": str(i)})
            if i == 20:
                print("ready", flush=True)
    """
)


def run_child(directory: Path, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start a child process on the spool; return it and its first line of output."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()  # SIGKILL: no close, no finally
    proc.wait(10)
    for stream in (proc.stdin, proc.stdout):
        assert stream is not None
        stream.close()


def test_a_killed_processs_claim_is_delivered_again_at_open(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=MB) as spool:
        fill(spool, 2)
    proc, line = run_child(tmp_path, "claim")
    assert int(line) == 1
    kill(proc)
    with Spool(tmp_path, max_bytes=MB) as spool:
        assert [int(i.meta["i"]) for i in drain(spool)] == [0, 1]
        assert os.listdir(tmp_path / "owners") == [f"{spool._token}.lock"]


def test_a_killed_processs_claim_is_delivered_again_on_a_later_claim(tmp_path: Path) -> None:
    clock = Clock()
    with Spool(tmp_path, max_bytes=MB, wall_ns=clock) as spool:
        fill(spool, 1)
        proc, line = run_child(tmp_path, "claim")
        assert int(line) == 1
        clock.advance(10)
        assert spool.claim() is None  # the child lives: its claim stands
        kill(proc)
        assert spool.claim() is None  # the next check is due in 5 s
        clock.advance(5)
        item = spool.claim()
        assert item is not None
        assert item.id == 1
        assert item.body == body_of(0)


def test_a_process_killed_mid_put_loop_leaves_every_committed_item_intact(
    tmp_path: Path,
) -> None:
    proc, line = run_child(tmp_path, "put")
    assert line == "ready"
    kill(proc)
    with Spool(tmp_path, max_bytes=1 << 30) as spool:
        items = drain(spool)
        assert spool.statistics().corrupt_items == 0
    assert len(items) > 20
    assert [int(i.meta["i"]) for i in items] == list(range(len(items)))
    assert intact(items)


# -- damage -------------------------------------------------------------------------------


def wal_commits(wal: bytes) -> list[int]:
    """The offsets at which each committed transaction of a WAL file ends."""
    if len(wal) < 32:
        return []
    (page_size,) = struct.unpack(">I", wal[8:12])
    frame = 24 + page_size
    ends = []
    for offset in range(32, len(wal) - frame + 1, frame):
        (db_size,) = struct.unpack(">I", wal[offset + 4 : offset + 8])
        if db_size:  # a commit frame
            ends.append(offset + frame)
    return ends


def test_a_torn_wal_keeps_every_earlier_transaction(tmp_path: Path) -> None:
    live = tmp_path / "live"
    spool = Spool(live, max_bytes=MB)
    # Test hook: no checkpoints, so every transaction stays in the WAL.
    spool._db.execute("PRAGMA wal_autocheckpoint = 0")
    setup = len(wal_commits((live / "spool.sqlite3-wal").read_bytes()))
    fill(spool, 30, size=300)
    db = (live / "spool.sqlite3").read_bytes()
    wal = (live / "spool.sqlite3-wal").read_bytes()  # as a killed process leaves it
    spool.close()
    ends = wal_commits(wal)
    assert len(ends) == setup + 30
    cuts = [0, 20, 40, ends[0] - 1, ends[0], ends[setup] + 100, ends[15] - 7, ends[15]]
    cuts += [ends[15] + 4096, ends[-1] - 1, ends[-1]]
    for n, cut in enumerate(cuts):
        copy = tmp_path / f"cut{n}"
        copy.mkdir()
        (copy / "spool.sqlite3").write_bytes(db)
        (copy / "spool.sqlite3-wal").write_bytes(wal[:cut])
        with Spool(copy, max_bytes=MB) as torn:
            items = drain(torn)
            assert torn.statistics().damaged_files == 0
        complete = sum(end <= cut for end in ends)
        assert [int(i.meta["i"]) for i in items] == list(range(max(0, complete - setup))), cut
        assert intact(items, 300)


def make_closed_spool(directory: Path, n: int) -> Path:
    with Spool(directory, max_bytes=16 * MB) as spool:
        fill(spool, n)
    return directory / "spool.sqlite3"


def test_flipped_body_bytes_are_a_counted_corrupt_item(tmp_path: Path) -> None:
    path = make_closed_spool(tmp_path, 5)
    data = bytearray(path.read_bytes())
    at = data.index(b"item-00002|") + 500
    data[at : at + 3] = bytes(b ^ 0xFF for b in data[at : at + 3])
    path.write_bytes(data)
    with Spool(tmp_path, max_bytes=MB) as spool, structlog.testing.capture_logs() as logs:
        items = drain(spool)
        stats = spool.statistics()
    assert [int(i.meta["i"]) for i in items] == [0, 1, 3, 4]
    assert intact(items)
    assert (stats.corrupt_items, stats.corrupt_count, stats.damaged_files) == (1, 2, 0)
    assert [log["event"] for log in logs] == ["spool item damaged (checksum or fields); deleted"]


def open_damaged(directory: Path, n: int) -> tuple[list[SpoolItem], Mapping[str, object]]:
    """Open a spool whose file ``make_closed_spool(directory, n)`` damaged; check the recovery."""
    with structlog.testing.capture_logs() as logs:
        spool = Spool(directory, max_bytes=16 * MB)
    items = drain(spool)
    spool.close()
    stats = spool.statistics()
    assert stats.damaged_files == 1
    assert stats.salvaged_items == len(items)
    assert stats.salvaged_items + stats.corrupt_items == n
    assert intact(items)
    assert [i.id for i in items] == sorted(i.id for i in items)
    (log,) = logs
    copy = Path(str(log["damaged_copy"]))
    assert copy.parent == directory and copy.name.startswith("damaged-") and copy.exists()
    assert log["salvaged_items"] == len(items)
    return items, log


def test_overwritten_pages_move_the_file_aside_and_salvage_the_rest(tmp_path: Path) -> None:
    path = make_closed_spool(tmp_path, 60)
    with path.open("r+b") as f:
        f.seek(10 * 4096)
        f.write(bytes(range(256)) * 32)  # pages 11 and 12
    items, log = open_damaged(tmp_path, 60)
    assert 30 < len(items) < 60
    assert "malformed" in str(log["problem"])


def test_a_truncated_database_file_is_moved_aside_and_salvaged(tmp_path: Path) -> None:
    path = make_closed_spool(tmp_path, 60)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2 + 1000)
    items, log = open_damaged(tmp_path, 60)
    assert len(items) > 10
    assert 0 < int(str(log["corrupt_items"])) < 50


def test_a_file_that_is_not_a_database_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "spool.sqlite3").write_bytes(b"not a database at all" * 100)
    items, log = open_damaged(tmp_path, 0)
    assert items == []
    assert log["problem"] == "file is not a database"
    assert not any(p.name.endswith(("-shm", "-wal")) for p in tmp_path.glob("damaged-*"))
    with Spool(tmp_path, max_bytes=MB) as spool:
        fill(spool, 2)
        assert spool.statistics().damaged_files == 0


def test_damage_found_while_open_is_recovered_on_the_spot(tmp_path: Path) -> None:
    path = make_closed_spool(tmp_path, 60)
    spool = Spool(tmp_path, max_bytes=16 * MB)
    with path.open("r+b") as f:
        f.seek(10 * 4096)
        f.write(bytes(range(256)) * 32)
    spool._db.execute("PRAGMA shrink_memory")  # test hook: forget the cached pages
    with structlog.testing.capture_logs() as logs:
        items = drain(spool)
    stats = spool.statistics()
    spool.close()
    assert stats.damaged_files == 1
    assert intact(items)
    unique = {item.meta["i"] for item in items}
    assert len(unique) + stats.corrupt_items == 60  # at least once: an unacked item comes again
    assert "spool database damaged" in " ".join(log["event"] for log in logs)


def test_a_spool_follows_another_processs_recovery(tmp_path: Path) -> None:
    clock = Clock()
    path = make_closed_spool(tmp_path, 3)
    with Spool(tmp_path, max_bytes=MB, wall_ns=clock) as old:
        data = bytearray(path.read_bytes())
        data[4096 : 3 * 4096] = b"\xa5" * 8192
        path.write_bytes(data)
        with structlog.testing.capture_logs():
            recovering = Spool(tmp_path, max_bytes=MB)
        assert recovering.statistics().damaged_files == 1
        clock.advance(6)
        assert old.put("otlp", body_of(7), 1, {"i": "7"})  # written to the new file
        assert recovering.pending() == 1 + recovering.statistics().salvaged_items
        recovering.close()


# -- a model ------------------------------------------------------------------------------


@dataclass
class Entry:
    seq: int
    kind: str
    claimed: SpoolItem | None = None


class SpoolMachine(RuleBasedStateMachine):
    """The spool against a list: FIFO of unacked items, claimed ones skipped by claim."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.spool = Spool(self.tmp.name, max_bytes=64 * MB)
        self.model: list[Entry] = []
        self.seq = 0

    def teardown(self) -> None:
        self.spool.close()
        self.tmp.cleanup()

    def claimed(self) -> list[Entry]:
        return [e for e in self.model if e.claimed is not None]

    @rule(kind=st.sampled_from("abc"), size=st.integers(0, 300))
    def put(self, kind: str, size: int) -> None:
        assert self.spool.put(kind, body_of(self.seq, size), size, {"i": str(self.seq)})
        self.model.append(Entry(self.seq, kind))
        self.seq += 1

    @rule(kinds=st.none() | st.sets(st.sampled_from("abc")))
    def claim(self, kinds: set[str] | None) -> None:
        item = self.spool.claim(kinds)
        wanted = [e for e in self.model if not e.claimed and (kinds is None or e.kind in kinds)]
        if not wanted:
            assert item is None
            return
        assert item is not None
        assert (int(item.meta["i"]), item.kind) == (wanted[0].seq, wanted[0].kind)
        assert item.body == body_of(wanted[0].seq, item.count)
        wanted[0].claimed = item

    @precondition(lambda self: self.claimed())
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(self.claimed()))
        assert entry.claimed is not None
        self.spool.ack(entry.claimed)
        self.model.remove(entry)

    @precondition(lambda self: self.claimed())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(self.claimed()))
        assert entry.claimed is not None
        self.spool.release(entry.claimed)
        entry.claimed = None

    @rule()
    def reopen(self) -> None:
        self.spool.close()
        self.spool = Spool(self.tmp.name, max_bytes=64 * MB)
        for entry in self.model:
            entry.claimed = None

    @invariant()
    def counts_agree(self) -> None:
        free = [e for e in self.model if e.claimed is None]
        assert self.spool.pending() == len(free)
        assert self.spool.pending("a") == sum(e.kind == "a" for e in free)
        assert self.spool.statistics().items == len(self.model)


TestSpoolModel = SpoolMachine.TestCase
TestSpoolModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
