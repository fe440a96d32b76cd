"""The SQLite interpreter's hand-off between the event loop and its connection threads."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from zerver.runtime.interpreters import SqliteInterpreter
from zerver.runtime.interpreters._sqlite import _Answers, _Outbox


def test_answers_from_many_threads_each_arrive_once() -> None:
    """Four threads post 2 000 answers each as fast as they can; every one reaches
    its waiter on the loop exactly once, with fewer loop wake-ups than answers."""
    got: list[tuple[int, int]] = []
    wakeups = 0

    class Counted(_Answers):
        def deliver(self) -> None:
            nonlocal wakeups
            wakeups += 1
            super().deliver()

    async def main() -> None:
        answers = Counted(asyncio.get_running_loop())
        finished = asyncio.Event()
        expected = 4 * 2000

        def done(ok: bool, value: Any) -> None:
            assert ok
            got.append(value)
            if len(got) == expected:
                finished.set()

        def poster(t: int) -> None:
            for i in range(2000):
                answers.post(done, True, (t, i))

        threads = [threading.Thread(target=poster, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        await asyncio.wait_for(finished.wait(), 30)
        for th in threads:
            th.join()

    asyncio.run(main())
    assert sorted(got) == [(t, i) for t in range(4) for i in range(2000)]
    for t in range(4):
        assert [i for tt, i in got if tt == t] == list(range(2000))  # each thread's in order
    assert wakeups < len(got)


def test_a_raising_waiter_does_not_strand_the_answers_behind_it() -> None:
    got: list[int] = []

    async def main() -> None:
        answers = _Answers(asyncio.get_running_loop())

        def bad(ok: bool, value: Any) -> None:
            raise RuntimeError("waiter broke")

        def good(ok: bool, value: Any) -> None:
            got.append(value)

        answers.ready.extend([(good, True, 1), (bad, True, 2), (good, True, 3)])
        answers.scheduled = True
        with pytest.raises(RuntimeError, match="waiter broke"):
            answers.deliver()
        assert got == [1]
        for _ in range(3):  # the rest were scheduled for the loop's next turn
            await asyncio.sleep(0)
        assert got == [1, 3]
        assert not answers.scheduled

    asyncio.run(main())


def test_statements_share_the_pool_and_threads_end_on_close(tmp_path: Path) -> None:
    """A statement held inside one connection's thread does not stop the others:
    the threads take statements from one queue. Closing ends every thread."""

    async def main() -> None:
        interp = SqliteInterpreter(tmp_path / "db.sqlite3", pool_size=2)
        await interp.start()
        await interp.put("t", "k", 1)
        release = threading.Event()
        entered = threading.Event()

        def held(conn: Any) -> str:
            entered.set()
            release.wait(30)
            return "held"

        slow = asyncio.ensure_future(interp._run(None, "hold", held))
        assert await asyncio.to_thread(entered.wait, 30)
        for _ in range(20):  # the other connection serves these meanwhile
            assert await asyncio.wait_for(interp.get("t", "k"), 30) == 1
        assert not slow.done()
        release.set()
        assert await asyncio.wait_for(slow, 30) == "held"
        threads = [ct.thread for ct in interp._threads_open]
        assert len(threads) == 2
        await interp.aclose()
        for th in threads:
            th.join(30)
            assert not th.is_alive()
        assert interp.limiter.in_use == 0

    asyncio.run(main())


def test_statements_asked_in_one_turn_reach_the_threads_together() -> None:
    """Nothing reaches the shared queue while the turn that asks goes on; at the
    start of the next turn every statement asked meanwhile is there, in order."""
    import queue

    async def main() -> None:
        work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        outbox = _Outbox(asyncio.get_running_loop(), work)
        items = [(lambda conn, i=i: i, lambda ok, value: None) for i in range(5)]
        for item in items:
            outbox.put(item)
            assert work.empty()
        await asyncio.sleep(0)  # one turn of the loop
        assert [work.get_nowait() for _ in items] == items and work.empty()
        outbox.put(items[0])
        outbox.flush()  # as on close: no later turn is needed
        assert work.get_nowait() == items[0]
        await asyncio.sleep(0)
        assert work.empty()  # the turn's flush found nothing left to put

    asyncio.run(main())


def test_statements_asked_just_before_close_still_run(tmp_path: Path) -> None:
    """Two reads have asked for their statements (not yet put) and four wait for a
    connection when the pool closes: the two run before the threads end, the four
    on the pool opened again, as any call after close would."""

    async def main() -> None:
        interp = SqliteInterpreter(tmp_path / "db.sqlite3", pool_size=2)
        await interp.start()
        await interp.put("t", "k", 1)
        reads = [asyncio.ensure_future(interp.get("t", "k")) for _ in range(6)]
        await asyncio.sleep(0)
        assert len(interp._outbox.pending) == 2 and interp.limiter.in_use == 2  # type: ignore[union-attr]
        threads = [ct.thread for ct in interp._threads_open]
        await interp.aclose()
        assert await asyncio.wait_for(asyncio.gather(*reads), 30) == [1] * 6
        for th in threads:
            th.join(30)
            assert not th.is_alive()
        reopened = [ct.thread for ct in interp._threads_open]
        assert len(reopened) == 2
        await interp.aclose()
        for th in reopened:
            th.join(30)
            assert not th.is_alive()
        assert interp.limiter.in_use == 0

    asyncio.run(main())
