"""The exporter process's CPU share: the rule (fed backlogs and times) and the real
scheduler policies it sets (Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerver.trace._cpu_share import (
    IDLE,
    NORMAL,
    CpuShare,
    set_priority,
    spare_cpu_unavailable,
)

LINUX = hasattr(os, "SCHED_IDLE") and hasattr(os, "sched_getscheduler")


def test_it_takes_spare_time_until_the_backlog_reaches_half() -> None:
    share = CpuShare()
    assert share.mode == IDLE
    assert [share.observe(float(t), b) for t, b in enumerate([0.0, 0.1, 0.3, 0.49])] == [None] * 4
    assert share.observe(4.0, 0.5) == NORMAL
    assert (share.mode, share.raised) == (NORMAL, 1)
    assert share.observe(4.1, 0.9) is None  # already there: no second switch


def test_it_gives_the_cpu_back_only_after_a_calm_second() -> None:
    share = CpuShare(calm_s=1.0)
    share.observe(0.0, 0.6)
    assert share.observe(1.0, 0.3) is None  # below raise_at, not below lower_at
    assert share.observe(2.0, 0.2) is None  # calm from here...
    assert share.observe(2.5, 0.3) is None  # ...not any more
    assert share.observe(3.0, 0.1) is None  # calm again from 3.0
    assert share.observe(3.9, 0.0) is None
    assert share.observe(4.0, 0.0) == IDLE
    assert (share.mode, share.raised) == (IDLE, 1)
    assert share.observe(5.0, 0.7) == NORMAL
    assert share.raised == 2


def test_held_it_stays_at_normal_priority() -> None:
    share = CpuShare(calm_s=0.0)
    assert share.hold() == NORMAL
    assert share.observe(10.0, 0.0) is None
    assert share.mode == NORMAL
    assert share.hold() is None
    assert share.raised == 0  # held for the drain, not behind


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"raise_at": 0.0}, "raise_at"),
        ({"raise_at": 1.5}, "raise_at"),
        ({"lower_at": 0.5}, "lower_at"),
        ({"lower_at": -0.1}, "lower_at"),
        ({"calm_s": -1.0}, "calm_s"),
    ],
)
def test_thresholds_are_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CpuShare(**kwargs)


@given(
    st.lists(
        st.tuples(st.floats(0, 5, allow_nan=False), st.floats(0, 1, allow_nan=False)),
        max_size=40,
    )
)
def test_a_large_backlog_always_ends_at_normal_priority(steps: list[tuple[float, float]]) -> None:
    """Whatever came before, an observed backlog at raise_at or more leaves the exporter
    at normal priority; every switch it reports is a real change; raised counts the
    switches to normal."""
    share = CpuShare()
    now, switches_up, mode = 0.0, 0, share.mode
    for gap, backlog in steps:
        now += gap
        change = share.observe(now, backlog)
        if change is not None:
            assert change != mode
            switches_up += change == NORMAL
        mode = share.mode
        if backlog >= share.raise_at:
            assert share.mode == NORMAL
    assert share.raised == switches_up


# -- the scheduler (Linux) ------------------------------------------------------------


def _policy_of(tid: int) -> int:
    return os.sched_getscheduler(tid)


@pytest.mark.skipif(not LINUX, reason="SCHED_IDLE is Linux's")
def test_threads_go_to_idle_priority_and_back() -> None:
    if spare_cpu_unavailable() is not None:
        pytest.skip("this process may not leave SCHED_IDLE (no CAP_SYS_NICE)")
    done = threading.Event()
    threads = [threading.Thread(target=done.wait, args=(10,)) for _ in range(2)]
    for t in threads:
        t.start()  # its native id is known once start returns
    tids = [t.native_id for t in threads if t.native_id is not None]
    try:
        set_priority(IDLE, tids)
        assert [_policy_of(t) for t in tids] == [os.SCHED_IDLE] * 2
        assert _policy_of(threading.get_native_id()) == os.SCHED_OTHER  # only those
        set_priority(NORMAL, tids)
        assert [_policy_of(t) for t in tids] == [os.SCHED_OTHER] * 2
    finally:
        done.set()
        for t in threads:
            t.join()
    set_priority(NORMAL, tids)  # gone by now: skipped, not an error


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="needs root to drop privileges")
def test_an_unprivileged_process_says_why_it_stays_at_normal_priority() -> None:
    """Leaving SCHED_IDLE needs CAP_SYS_NICE (or RLIMIT_NICE 20): as user nobody, with
    RLIMIT_NICE 0, the probe says so and leaves the process as it was."""
    code = (
        "import os, resource\n"
        "from zerver.trace._cpu_share import spare_cpu_unavailable\n"
        "resource.setrlimit(resource.RLIMIT_NICE, (0, 0))\n"
        "os.setgid(65534)\n"
        "os.setuid(65534)\n"
        "print(spare_cpu_unavailable())\n"
        "print(os.sched_getscheduler(0) == os.SCHED_OTHER)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out[0].startswith("leaving SCHED_IDLE again needs CAP_SYS_NICE or RLIMIT_NICE 20")
    assert out[1] == "True"
