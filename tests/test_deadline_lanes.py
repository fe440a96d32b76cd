"""The lanes that fire effect attempts' timeouts on asyncio (one timer per timeout length)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from zerver.runtime._jobs import _Deadlines, _Lane


class FakeHandle:
    def __init__(self, when: float, callback: Any, args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The loop's clock and timers, advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any, *args: Any) -> FakeHandle:
        handle = FakeHandle(when, callback, args)
        self.handles.append(handle)
        return handle

    def run_until(self, t: float) -> None:
        """Fire every timer due by ``t``, in order, the clock at each one's time."""
        while True:
            due = [h for h in self.handles if not h.cancelled and h.when <= t]
            if not due:
                break
            h = min(due, key=lambda x: x.when)
            self.handles.remove(h)
            self.now = max(self.now, h.when)
            h.callback(*h.args)
        self.now = max(self.now, t)


class FakeTimeout:
    def __init__(self) -> None:
        self.fired_at: list[float] = []

    def reschedule(self, when: float | None) -> None:
        assert when is not None
        self.fired_at.append(when)


def test_one_timer_per_length_fires_only_live_attempts_at_their_deadlines() -> None:
    loop = FakeLoop()
    lanes = _Deadlines(loop)  # type: ignore[arg-type]
    a, b, c = FakeTimeout(), FakeTimeout(), FakeTimeout()
    ea = lanes.watch(1.0, 1.0, a)  # type: ignore[arg-type]
    loop.now = 0.1
    eb = lanes.watch(1.0, 1.1, b)  # type: ignore[arg-type]
    loop.now = 0.2
    lanes.watch(1.0, 1.2, c)  # type: ignore[arg-type]
    assert ea is not None and eb is not None
    assert len(loop.handles) == 1  # one timer for the lane, at the oldest deadline
    ea[2] = False  # a ended in time
    loop.run_until(1.15)
    assert a.fired_at == [] and b.fired_at == [1.1] and c.fired_at == []
    loop.run_until(5.0)
    assert c.fired_at == [1.2]
    assert not [h for h in loop.handles if not h.cancelled]  # nothing left to watch


def test_dead_entries_leave_as_new_ones_arrive() -> None:
    loop = FakeLoop()
    lanes = _Deadlines(loop)  # type: ignore[arg-type]
    for i in range(1000):
        loop.now = i * 0.001
        entry = lanes.watch(1.0, loop.now + 1.0, FakeTimeout())  # type: ignore[arg-type]
        assert entry is not None
        entry[2] = False  # every attempt ends well before its deadline
    (lane,) = lanes._lanes.values()
    assert len(lane.entries) == 1  # only the newest, dead but not yet met at the front


def test_a_long_attempt_at_the_front_does_not_let_the_lane_grow() -> None:
    """One attempt runs long (it is live, at the front); thousands behind it end
    at once. The lane sweeps them out, so it holds about twice its live entries,
    and the long one still fires at its deadline."""
    loop = FakeLoop()
    lanes = _Deadlines(loop)  # type: ignore[arg-type]
    long_one = FakeTimeout()
    assert lanes.watch(60.0, 60.0, long_one) is not None  # type: ignore[arg-type]
    sizes = []
    for i in range(1, 20_000):
        loop.now = i * 0.001
        entry = lanes.watch(60.0, loop.now + 60.0, FakeTimeout())  # type: ignore[arg-type]
        assert entry is not None
        entry[2] = False
        (lane,) = lanes._lanes.values()
        sizes.append(len(lane.entries))
    assert max(sizes) <= _Lane.SWEEP_MIN + 1
    loop.run_until(60.0)
    assert long_one.fired_at == [60.0]


def test_out_of_order_or_too_many_lengths_arm_their_own_timer() -> None:
    loop = FakeLoop()
    lanes = _Deadlines(loop)  # type: ignore[arg-type]
    assert lanes.watch(1.0, 2.0, FakeTimeout()) is not None  # type: ignore[arg-type]
    assert lanes.watch(1.0, 1.5, FakeTimeout()) is None  # type: ignore[arg-type]
    for i in range(1, _Deadlines.MAX_LANES):
        assert lanes.watch(float(i + 1), 3.0, FakeTimeout()) is not None  # type: ignore[arg-type]
    assert lanes.watch(999.0, 3.0, FakeTimeout()) is None  # type: ignore[arg-type]
    lanes.close()
    assert all(h.cancelled for h in loop.handles)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.5, 1.0, 2.5]),  # timeout length
            st.floats(0.0, 0.3),  # time passing before the attempt starts
            st.floats(0.0, 3.0),  # how long the attempt would run
        ),
        min_size=1,
        max_size=40,
    )
)
def test_every_attempt_times_out_exactly_when_it_outlives_its_deadline(
    attempts: list[tuple[float, float, float]],
) -> None:
    """Attempts start and end at random times on several lengths: each one that
    runs past its deadline is fired once, at its deadline (by the lane's timer, on
    time); none that ends first is ever fired."""
    loop = FakeLoop()
    lanes = _Deadlines(loop)  # type: ignore[arg-type]
    t = 0.0
    ends: list[tuple[float, float, list[Any], FakeTimeout]] = []
    for length, gap, runs in attempts:
        t += gap
        # Attempts that end before this one starts, in the order they end.
        for end, _dl, entry, _to in sorted(ends, key=lambda e: e[0]):
            if loop.now <= end <= t and entry[2]:
                loop.run_until(end)
                if entry[0] > end:  # ended before its deadline (a tie goes to the timer)
                    entry[2] = False
        loop.run_until(t)
        timeout = FakeTimeout()
        watched = lanes.watch(length, t + length, timeout)  # type: ignore[arg-type]
        assert watched is not None
        ends.append((t + runs, t + length, watched, timeout))
    for end, _dl, entry, _to in sorted(ends, key=lambda e: e[0]):
        if end >= loop.now and entry[2]:
            loop.run_until(end)
            if entry[0] > end:
                entry[2] = False
    loop.run_until(t + 10.0)
    for end, deadline, _entry, timeout in ends:
        if end < deadline:
            assert timeout.fired_at == []
        else:
            assert timeout.fired_at == [deadline]
