"""Durations and promotion: which job internals deserve a span of their own.

Sans-I/O: fed finished :class:`~zerver.trace.JobState` values, it derives

* ``queue_wait = take - enqueue``, ``dispatch = start - take``,
* ``park_wait_total = Σ(resume - park)``, ``run_active = (end - start) - park_wait_total``,
* ``total = end - enqueue``,

(a phase that never happened counts 0; milliseconds as floats) and decides in
O(1) whether a queue wait or a park episode is promoted: it is when it
reaches the configured threshold, or the route's rolling p95 for that kind of
wait, or always with ``ZER_VER_DEBUG_JOBS=1``.

The rolling p95 is kept per route in a bounded ring of recent samples; the
percentile is recomputed every :data:`RECOMPUTE_EVERY` samples, so a check
is a comparison with a cached number. It only applies once a route has
:data:`MIN_SAMPLES` samples, and only to waits of at least
``ZER_VER_PROMOTE_P95_MIN_MS`` (default 1 ms).
"""

from __future__ import annotations

import math
from collections import deque

from zerver._specs import Window

from ._records import JobState

__all__ = [
    "MIN_SAMPLES",
    "JobDurations",
    "Promoter",
    "RollingPercentile",
    "RouteStats",
    "durations",
    "job_durations",
]

MIN_SAMPLES = 20
RECOMPUTE_EVERY = 32


def job_durations(job: JobState, end_fallback: int) -> tuple[float, float, float, float, float]:
    """``(queue_wait, dispatch, park_wait_total, run_active, total)`` of ``job`` in ms.

    A job still running ends at ``end_fallback``. The one place these are derived:
    :class:`JobDurations` and the trace engine both call it.
    """
    enq = job.enqueue_ts
    take = job.take_ts
    start = job.start_ts
    end = job.end_ts
    if end is None:
        end = end_fallback
    if enq is None:
        enq = take if take is not None else end
    # Conditionals, not min()/max(): on CPython 3.11 each builtin call costs ~0.14 µs,
    # a third of this function, and it runs for every job of every request. A
    # CPython 3.11 speed-up: re-measure with loadtest/bench_trace.py on a newer oldest
    # supported Python and use the builtins once they cost no more.
    # A job never taken (cancelled while queued, refused by a full queue) spent
    # all its time queued: the phases it never reached count 0.
    if take is None:
        take = end if end > enq else enq
    if start is None:
        start = take
    if start > end:
        end = start
    park = 0
    for ep in job.park_episodes:
        resume = ep.resume_ts if ep.resume_ts is not None else end
        if resume > ep.park_ts:
            park += resume - ep.park_ts
    run = end - start
    if park > run:  # overlapping episodes cannot park longer than the job ran
        park = run
    return (
        (take - enq) / 1e6,
        (start - take) / 1e6,
        park / 1e6,
        (run - park) / 1e6,
        (end - enq) / 1e6,
    )


class JobDurations:
    """The derived durations of one job, in milliseconds."""

    __slots__ = (
        "dispatch_ms",
        "park_count",
        "park_wait_ms_total",
        "queue_wait_ms",
        "run_active_ms",
        "total_ms",
    )

    def __init__(self, job: JobState, end_fallback: int) -> None:
        (
            self.queue_wait_ms,
            self.dispatch_ms,
            self.park_wait_ms_total,
            self.run_active_ms,
            self.total_ms,
        ) = job_durations(job, end_fallback)
        self.park_count = len(job.park_episodes)


def durations(job: JobState, end_fallback: int = 0) -> JobDurations:
    """Derived durations of ``job``; an unfinished job ends at ``end_fallback``."""
    return JobDurations(job, end_fallback)


class RollingPercentile:
    """A percentile over a bounded rolling window of samples."""

    __slots__ = ("_due", "_every", "_max_age_ns", "_q", "_since", "_stamps", "_values", "value")

    def __init__(self, window: Window, q: float = 0.95) -> None:
        size = window.count if window.count is not None else window.max_samples
        self._values: deque[float] = deque(maxlen=size)
        self._stamps: deque[int] = deque(maxlen=size)
        self._max_age_ns = int(window.seconds * 1e9) if window.seconds is not None else None
        self._q = q
        self._since = 0
        # Recompute after an eighth of the window has changed (at least every 32):
        # sorting is C-speed, and amortised it costs well under a microsecond.
        self._every = max(RECOMPUTE_EVERY, size // 8)
        self.value = math.inf
        # Samples until the next recompute: sooner while there is no percentile yet.
        self._due = MIN_SAMPLES

    def add(self, now_ns: int, sample: float) -> None:
        self._values.append(sample)
        self._stamps.append(now_ns)
        self._since += 1
        if self._since >= self._due:
            self._recompute(now_ns)

    def _recompute(self, now_ns: int) -> None:
        self._since = 0
        values, stamps = self._values, self._stamps
        if self._max_age_ns is not None:
            horizon = now_ns - self._max_age_ns
            while stamps and stamps[0] < horizon:
                stamps.popleft()
                values.popleft()
        if len(values) < MIN_SAMPLES:
            self.value = math.inf
            self._due = MIN_SAMPLES
            return
        ordered = sorted(values)
        rank = max(math.ceil(self._q * len(ordered)) - 1, 0)
        self.value = ordered[rank]
        self._due = self._every

    def __len__(self) -> int:
        return len(self._values)


class RouteStats:
    __slots__ = ("park", "queue")

    def __init__(self, window: Window) -> None:
        self.queue = RollingPercentile(window)
        self.park = RollingPercentile(window)


class Promoter:
    """Decides promotions and keeps the per-route rolling p95s."""

    __slots__ = ("_routes", "_window", "debug", "max_routes", "p95_min_ms", "park_ms", "queue_ms")

    def __init__(
        self,
        *,
        queue_ms: float = 5.0,
        park_ms: float = 5.0,
        debug: bool = False,
        window: Window | None = None,
        max_routes: int = 1024,
        p95_min_ms: float = 1.0,
    ) -> None:
        self.queue_ms = queue_ms
        # The route-p95 rule only promotes waits at least this long: on a fast route
        # the p95 may be microseconds, and such waits tell nobody anything.
        self.p95_min_ms = p95_min_ms
        self.park_ms = park_ms
        self.debug = debug
        self._window = window if window is not None else Window(seconds=60.0)
        self._routes: dict[str, RouteStats] = {}
        self.max_routes = max_routes

    def stats(self, route: str) -> RouteStats:
        st = self._routes.get(route)
        if st is None:
            if len(self._routes) >= self.max_routes:  # bounded: templates only, but be safe
                self._routes.pop(next(iter(self._routes)))
            st = self._routes[route] = RouteStats(self._window)
        return st

    def bars(self, stats: RouteStats) -> tuple[float, float]:
        """The shortest queue wait and park episode (ms) that get a span of their own now.

        Each is the threshold, or the route's p95 when that is lower (but not below
        ``p95_min_ms``); 0 with ``debug``. One comparison per wait then decides.
        """
        if self.debug:
            return 0.0, 0.0
        # min(threshold, max(p95_min, p95)), written as conditionals (cheaper than the
        # builtins on CPython 3.11, as in job_durations; the same test decides when it
        # can go); a property test holds it to the rule.
        p95_min = self.p95_min_ms
        queue = stats.queue.value
        if queue < p95_min:
            queue = p95_min
        if queue > self.queue_ms:
            queue = self.queue_ms
        park = stats.park.value
        if park < p95_min:
            park = p95_min
        if park > self.park_ms:
            park = self.park_ms
        return queue, park

    def promote_queue(self, stats: RouteStats, queue_wait_ms: float) -> bool:
        """Whether a queue wait gets a ``job.queue_wait`` span."""
        return queue_wait_ms >= self.bars(stats)[0]

    def promote_park(self, stats: RouteStats, park_ms: float) -> bool:
        """Whether a park episode gets a ``job.park(<cause>)`` span."""
        return park_ms >= self.bars(stats)[1]

    def route_p95(self, route: str) -> tuple[float, float]:
        """The route's current (queue wait, park wait) p95 in ms (``inf`` until known)."""
        st = self._routes.get(route)
        if st is None:
            return math.inf, math.inf
        return st.queue.value, st.park.value
