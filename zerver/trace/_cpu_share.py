"""The exporter process's share of the CPU: spare time while it keeps up, a fair share when behind.

Building and encoding a request's spans costs the exporter process about half
of what serving the request costs the server. At normal priority that work
competes with everything else on its cores, and a process woken to do its own
work (a worker process, a database, whatever else runs on the machine) waits
behind it. Measured on a two-core machine, with the server on one core and the
load generator beside the exporter on the other, that wait was a large part
of what tracing added to p99 latency (docs/performance.md).

So on Linux the exporter's threads run under ``SCHED_IDLE``: they get the CPU
time no other thread wants, and any other thread that wakes up takes the CPU
from them at once. Records that arrive faster than spare time builds them wait
in the spool. Time nobody else wants is not guaranteed, though: on a machine
whose every core is busy serving requests, an idle-priority exporter would
starve, and its records would fill the spool and then be lost. Hence the rule
kept by :class:`CpuShare`: once the backlog nears that point (the spool half
full, or without a spool the intake's memory), the threads return to normal
priority and take their fair share, as they did before, until the backlog is
small again.

Coming back from ``SCHED_IDLE`` needs ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` of
20 (Linux treats the idle policy as nice 20). :func:`spare_cpu_unavailable` tries
the round trip once at start; where it is refused (an unprivileged container,
for one) or the platform has no idle policy, the exporter stays at normal
priority and says why in one log line. ``ZER_VER_EXPORT_PRIORITY=normal`` asks for
normal priority throughout.

:class:`CpuShare` only decides (fed the backlog and the time); the
exporter process applies its decisions with :func:`set_priority`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from typing import Literal

__all__ = ["IDLE", "NORMAL", "CpuShare", "Priority", "set_priority", "spare_cpu_unavailable"]

Priority = Literal["idle", "normal"]
IDLE: Priority = "idle"
NORMAL: Priority = "normal"


class CpuShare:
    """When the exporter takes only spare CPU (:data:`IDLE`) and when its fair share.

    Fed by the exporter's reader thread, which keeps normal priority so that it
    sees batches arrive even while the others starve: :meth:`observe` as
    each batch comes in, with the intake's *backlog*, how close the records
    waiting are to being lost (0 to 1: with a spool, how full the spool is; without
    one, how full the intake's memory is). At ``raise_at`` or above the exporter
    is behind and takes its fair share; it goes back to spare time once the
    backlog has stayed below ``lower_at`` for ``calm_s`` seconds, so a saturated
    machine does not flip it at every batch.

    With a spool a burst of load is absorbed on disk and built in spare time
    after it; only a backlog that would otherwise fill the spool takes CPU from
    the requests.
    """

    __slots__ = ("_calm_since", "_held", "calm_s", "lower_at", "mode", "raise_at", "raised")

    def __init__(
        self, *, raise_at: float = 0.5, lower_at: float = 0.25, calm_s: float = 1.0
    ) -> None:
        if not 0 < raise_at <= 1:
            raise ValueError(f"raise_at must be in (0, 1], got {raise_at}")
        if not 0 <= lower_at < raise_at:
            raise ValueError(f"lower_at must be in [0, raise_at), got {lower_at}")
        if calm_s < 0:
            raise ValueError(f"calm_s must be >= 0, got {calm_s}")
        self.raise_at = raise_at
        self.lower_at = lower_at
        self.calm_s = calm_s
        self.mode: Priority = IDLE
        self.raised = 0
        """How many times the exporter fell behind and took its fair share."""
        self._calm_since: float | None = None
        self._held = False

    def observe(self, now: float, backlog: float) -> Priority | None:
        """The new priority when it changes, else None (``now`` in seconds)."""
        if self._held:
            return None
        if backlog >= self.raise_at:
            self._calm_since = None
            if self.mode == IDLE:
                self.mode = NORMAL
                self.raised += 1
                return NORMAL
            return None
        if self.mode == IDLE:
            return None
        if backlog >= self.lower_at:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since >= self.calm_s:
            self._calm_since = None
            self.mode = IDLE
            return IDLE
        return None

    def hold(self) -> Priority | None:
        """Normal priority from now on (the drain at shutdown must not wait for spare
        time); the new priority if it changed."""
        self._held = True
        self._calm_since = None
        if self.mode == IDLE:
            self.mode = NORMAL
            return NORMAL
        return None


def set_priority(priority: Priority, thread_ids: Iterable[int]) -> None:
    """Run the threads ``thread_ids`` (native ids, this process's) at ``priority``.

    Linux only (``SCHED_IDLE``); a thread that has exited meanwhile is skipped.
    """
    policy = os.SCHED_IDLE if priority == IDLE else os.SCHED_OTHER
    param = os.sched_param(0)
    for tid in thread_ids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setscheduler(tid, policy, param)


def spare_cpu_unavailable() -> str | None:
    """Why this process cannot use idle priority and come back from it, or None if it can.

    Tries the round trip on a thread of its own, so the caller's thread is
    untouched whatever the answer.
    """
    if not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_setscheduler"):
        return "this platform has no idle scheduling policy (SCHED_IDLE)"
    answer: list[str | None] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            set_priority(IDLE, [tid])
        except OSError as exc:
            answer.append(f"SCHED_IDLE refused: {exc.strerror or exc}")
            return
        try:
            set_priority(NORMAL, [tid])
        except OSError as exc:
            answer.append(
                "leaving SCHED_IDLE again needs CAP_SYS_NICE or RLIMIT_NICE 20 "
                f"({exc.strerror or exc})"
            )
            return
        answer.append(None)

    thread = threading.Thread(target=probe, name="zerver-priority-probe", daemon=True)
    thread.start()
    thread.join()
    return answer[0] if answer else "the probe thread failed"
