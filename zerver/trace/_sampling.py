"""Sampling: which requests' traces are kept, decided at request start and at its end.

Sans-I/O: the head sampler is a pure function of a trace id and the incoming
parent; the tail sampler is fed finished :class:`~zerver.trace.RequestRecord` values
and reads time only from them. Neither has a clock of its own.

Rules (docs/sampling.md says the same for users):

* **Head**, at request start, as the OpenTelemetry SDK decides it, so a trace id
  gets the same decision in zerver and in an SDK service behind it:

  ===================  ======================================================
  incoming parent      decision
  ===================  ======================================================
  none (or invalid)    root rule: ``trace_id & (2**64 - 1) < round(ratio * 2**64)``
  valid, sampled       parent-based: sampled; otherwise the root rule
  valid, not sampled   parent-based: not sampled; otherwise the root rule
  ===================  ======================================================

  The root rule is the SDK's ``TraceIdRatioBased`` (the low 64 bits of the
  trace id against a bound), ``always_on`` is ratio 1, ``always_off`` ratio 0.

* **Tail**, at request end. Every record, sampled or not, first is judged
  against its route's windows and then added to them, so a request is compared
  with those before it. A head-sampled record is kept with reason ``head``. A
  record that was not is kept when one of the configured triggers matches,
  with reason ``tail:<trigger>`` (the first match in the configured order):

  ====================  =================================================
  trigger               matches when
  ====================  =================================================
  ``error``             status >= 500, or a system fault
  ``p95`` / ``p99``     the duration is at or above the route's rolling
                        p95 / p99 of request durations
  ``required_failure``  a required effect failed (its span would be ERROR)
  ``slow_queue``        a job's queue wait, or one park episode, is at or
                        above the route's rolling p95 of queue waits (of
                        park episodes), and at least ``min_wait_ms``
  ``latency:<ms>``      the duration is at least ``<ms>`` milliseconds
  ====================  =================================================

  A route is the request's method and route template. Until a route's window
  holds :data:`MIN_SAMPLES` samples its percentiles are unknown and the
  percentile triggers do not fire.

Each rolling percentile is a :class:`RollingQuantile`: a bounded ring of the
window's samples and a log-bucketed histogram of them (a DDSketch with
deletions) indexed by a Fenwick tree, so adding, evicting and asking for a
percentile each cost O(log B) for B buckets, whatever the window's size. The
answer is the exact rank percentile of the window to within a relative error
of :data:`RELATIVE_ERROR` (values under :data:`MIN_VALUE_MS` count as 0,
values over :data:`MAX_VALUE_MS` as that).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable

from zerver._specs import SamplerSpec, Window

from ._promotion import MIN_SAMPLES, job_durations
from ._records import CANCEL, COMPLETE, RequestRecord

__all__ = [
    "MAX_VALUE_MS",
    "MIN_SAMPLES",
    "MIN_VALUE_MS",
    "RELATIVE_ERROR",
    "HeadSampler",
    "RollingQuantile",
    "TailSampler",
    "head_sampler",
    "ratio_bound",
    "tail_sampler",
]

#: The low 64 bits of a trace id are what the ratio rule reads (as the SDK does,
#: for compatibility with 64-bit trace ids).
TRACE_ID_LIMIT = (1 << 64) - 1


def ratio_bound(ratio: float) -> int:
    """The bound under which a trace id's low 64 bits are sampled at ``ratio``
    (the SDK's ``TraceIdRatioBased.get_bound_for_rate``)."""
    return round(ratio * (TRACE_ID_LIMIT + 1))


class HeadSampler:
    """The head decision: ``decide(trace_id, parent)``, ``parent`` being the
    sampled flag of a valid incoming parent, or ``None`` when there is none."""

    __slots__ = ("bound", "decide", "parent_based", "ratio")

    def __init__(self, ratio: float = 1.0, *, parent_based: bool = True) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"a sampling ratio is from 0 to 1, not {ratio!r}")
        self.ratio = ratio
        self.parent_based = parent_based
        self.bound = ratio_bound(ratio)
        # Picked once: the request path calls it for every request.
        self.decide: Callable[[int, bool | None], bool] = (
            self._parent_based if parent_based else self._root
        )

    def _root(self, trace_id: int, parent: bool | None) -> bool:
        return trace_id & TRACE_ID_LIMIT < self.bound

    def _parent_based(self, trace_id: int, parent: bool | None) -> bool:
        if parent is not None:
            return parent
        return trace_id & TRACE_ID_LIMIT < self.bound

    @property
    def follows_parent_or_samples(self) -> bool:
        """Whether the decision is always the parent's flag, else sampled
        (``head:1``, the default): what a request's flags say without a sampler."""
        return self.parent_based and self.bound > TRACE_ID_LIMIT

    def __repr__(self) -> str:
        kind = "parentbased_traceidratio" if self.parent_based else "traceidratio"
        return f"HeadSampler({kind}, ratio={self.ratio})"


def head_sampler(spec: SamplerSpec) -> HeadSampler:
    """The head sampler a parsed ``ZER_VER_SAMPLER`` / ``OTEL_TRACES_SAMPLER`` asks for."""
    return HeadSampler(spec.head_ratio, parent_based=spec.parent_based)


# -- rolling percentiles -----------------------------------------------------------------

#: The largest relative error of an estimated percentile (DDSketch's alpha).
RELATIVE_ERROR = 0.01
#: Smaller values count as 0 (one microsecond, in milliseconds).
MIN_VALUE_MS = 0.001
#: Larger values count as this (about 2.8 hours, in milliseconds).
MAX_VALUE_MS = 1e7

_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LN_GAMMA = math.log(_GAMMA)
# Bucket 1 holds [0, MIN_VALUE_MS); bucket k + 2 holds (MIN * g**(k-1), MIN * g**k]
# for g = _GAMMA, and answers for it the value within RELATIVE_ERROR of both ends.
_TOP = math.ceil(math.log(MAX_VALUE_MS / MIN_VALUE_MS) / _LN_GAMMA) + 2
_SIZE = 1 << _TOP.bit_length()  # a power of two, for the Fenwick descent
_REPRESENTATIVE = [0.0, 0.0] + [
    MIN_VALUE_MS * 2 * _GAMMA**k / (_GAMMA + 1) for k in range(_SIZE - 1)
]


def _bucket(value: float) -> int:
    """The bucket (1-based) of a non-negative sample."""
    if value < MIN_VALUE_MS:
        return 1
    if value >= MAX_VALUE_MS:
        return _TOP
    return math.ceil(math.log(value / MIN_VALUE_MS) / _LN_GAMMA) + 2


class RollingQuantile:
    """Percentiles over a rolling window (:class:`~zerver._specs.Window`) of samples.

    The window keeps the last ``window.count`` samples, or those of the last
    ``window.seconds`` but never more than ``window.max_samples``. Memory is
    fixed at construction: a ring of (timestamp, bucket) and a Fenwick tree.
    """

    __slots__ = ("_buckets", "_cap", "_head", "_max_age_ns", "_size", "_stamps", "_tree")

    def __init__(self, window: Window) -> None:
        cap = window.count if window.count is not None else window.max_samples
        self._cap = cap
        self._max_age_ns = int(window.seconds * 1e9) if window.seconds is not None else None
        self._stamps = array("q", bytes(8 * cap))
        self._buckets = array("H", bytes(2 * cap))
        self._head = 0  # the oldest sample's slot
        self._size = 0
        self._tree = array("l", bytes(8 * (_SIZE + 1)))

    def __len__(self) -> int:
        return self._size

    def _change(self, bucket: int, delta: int) -> None:
        tree = self._tree
        i = bucket
        while i <= _SIZE:
            tree[i] += delta
            i += i & -i

    def _evict_oldest(self) -> None:
        self._change(self._buckets[self._head], -1)
        self._head = (self._head + 1) % self._cap
        self._size -= 1

    def expire(self, now_ns: int) -> None:
        """Forget the samples older than a time window at ``now_ns``."""
        if self._max_age_ns is None:
            return
        horizon = now_ns - self._max_age_ns
        stamps = self._stamps
        while self._size and stamps[self._head] < horizon:
            self._evict_oldest()

    def add(self, now_ns: int, value: float) -> None:
        """Add a sample taken at ``now_ns`` (monotonic ns), forgetting expired ones."""
        self.expire(now_ns)
        if self._size == self._cap:
            self._evict_oldest()
        slot = (self._head + self._size) % self._cap
        bucket = _bucket(value)
        self._stamps[slot] = now_ns
        self._buckets[slot] = bucket
        self._size += 1
        self._change(bucket, 1)

    def quantile(self, q: float) -> float:
        """The ``q`` percentile (``ceil(q·n)``-th smallest sample) of the window, in
        the samples' unit; ``inf`` while the window has fewer than ``MIN_SAMPLES``."""
        n = self._size
        if n < MIN_SAMPLES:
            return math.inf
        rank = max(math.ceil(q * n) - 1, 0)
        # Fenwick descent: the last position whose prefix count is <= rank.
        tree = self._tree
        pos = 0
        step = _SIZE
        while step:
            nxt = pos + step
            if nxt <= _SIZE and tree[nxt] <= rank:
                pos = nxt
                rank -= tree[nxt]
            step >>= 1
        return _REPRESENTATIVE[pos + 1]


# -- tail sampling ---------------------------------------------------------------------


class _RouteWindows:
    """A route's windows: only those a configured trigger reads exist (each holds a
    window's worth of samples, so a route's ``error`` trigger costs none)."""

    __slots__ = ("duration", "park", "queue")

    def __init__(self, window: Window, *, duration: bool, waits: bool) -> None:
        self.duration = RollingQuantile(window) if duration else None
        self.queue = RollingQuantile(window) if waits else None
        self.park = RollingQuantile(window) if waits else None


_NOT_FAILED = (COMPLETE, CANCEL)


def _required_failure(facts: _Facts, w: _RouteWindows) -> bool:
    """Whether a required effect failed: the rule that makes its span ERROR."""
    for job in facts.record.jobs:
        effect = job.effect
        if effect is None or not effect.required:
            continue
        if job.outcome not in _NOT_FAILED:
            return True
    return False


class TailSampler:
    """Keeps a head-dropped request whose record matches a trigger.

    Feed it every finished record with :meth:`decide`; it answers the
    reason a record is kept (``"head"``, ``"tail:<trigger>"``) or ``None``.
    Per-route windows are bounded: at most ``max_routes`` routes, the oldest
    forgotten first.
    """

    __slots__ = (
        "_checks",
        "_durations",
        "_routes",
        "_waits",
        "_window",
        "kept",
        "max_routes",
        "min_wait_ms",
        "triggers",
    )

    def __init__(
        self,
        triggers: Iterable[str] = (),
        *,
        window: Window | None = None,
        min_wait_ms: float = 1.0,
        max_routes: int = 256,
    ) -> None:
        self.triggers = tuple(triggers)
        # (reason, check) per trigger, in the configured order: parsed once, here.
        self._checks = tuple(("tail:" + t, self._check(t)) for t in self.triggers)
        # Which windows the triggers read: only those are kept and fed.
        self._durations = "p95" in self.triggers or "p99" in self.triggers
        self._waits = "slow_queue" in self.triggers
        self._window = window if window is not None else Window(seconds=60.0)
        # slow_queue ignores waits shorter than this: on a route whose waits are all
        # ~0 the p95 is 0 too, and every request would match.
        self.min_wait_ms = min_wait_ms
        self.max_routes = max_routes
        self._routes: dict[str, _RouteWindows] = {}
        #: Records kept, by reason.
        self.kept: dict[str, int] = {}

    def _check(self, trigger: str) -> _Check:
        """The test a trigger stands for; ``ValueError`` for one that is not."""
        if trigger == "error":
            return _error
        if trigger == "p95":
            return _percentile(0.95)
        if trigger == "p99":
            return _percentile(0.99)
        if trigger == "required_failure":
            return _required_failure
        if trigger == "slow_queue":
            return self._slow_queue
        if trigger.startswith("latency:"):
            try:
                bar = float(trigger.removeprefix("latency:"))
            except ValueError:
                bar = math.nan
            if bar > 0:
                return _latency(bar)
        raise ValueError(f"unknown tail trigger {trigger!r}")

    def windows(self, record: RequestRecord) -> _RouteWindows:
        """The windows of ``record``'s route (its method and route template)."""
        key = f"{record.method} {record.route or ''}"
        w = self._routes.get(key)
        if w is None:
            if len(self._routes) >= self.max_routes:
                self._routes.pop(next(iter(self._routes)))
            w = self._routes[key] = _RouteWindows(
                self._window, duration=self._durations, waits=self._waits
            )
        return w

    def decide(self, record: RequestRecord) -> str | None:
        """Why ``record`` is kept, or ``None`` (left on ``record.sampling_reason`` for
        tracez too); then add it to its route's windows."""
        w = self.windows(record)
        end = record.end_ts if record.end_ts is not None else record.start_ts
        facts = _Facts(record, end)
        reason: str | None = None
        if record.trace_flags & 0x01:
            reason = "head"
        else:
            for why, check in self._checks:
                if check(facts, w):
                    reason = why
                    break
        if w.duration is not None:
            w.duration.add(end, facts.duration_ms)
        if w.queue is not None and w.park is not None:
            for job, d in zip(record.jobs, facts.waits(), strict=True):
                w.queue.add(end, d[0])
                for ep in job.park_episodes:
                    w.park.add(end, _episode_ms(ep.park_ts, ep.resume_ts, end))
        if reason is not None:
            self.kept[reason] = self.kept.get(reason, 0) + 1
        record.sampling_reason = reason
        return reason

    def _slow_queue(self, facts: _Facts, w: _RouteWindows) -> bool:
        if w.queue is None or w.park is None:
            return False  # not reached: the windows exist when this trigger is set
        end = facts.end
        w.queue.expire(end)
        w.park.expire(end)
        queue_bar = max(w.queue.quantile(0.95), self.min_wait_ms)
        park_bar = max(w.park.quantile(0.95), self.min_wait_ms)
        for job, d in zip(facts.record.jobs, facts.waits(), strict=True):
            if d[0] >= queue_bar:
                return True
            for ep in job.park_episodes:
                if _episode_ms(ep.park_ts, ep.resume_ts, end) >= park_bar:
                    return True
        return False


class _Facts:
    """What the triggers read of one finished record, derived at most once."""

    __slots__ = ("_waits", "duration_ms", "end", "record")

    def __init__(self, record: RequestRecord, end: int) -> None:
        self.record = record
        self.end = end
        self.duration_ms = (end - record.start_ts) / 1e6
        self._waits: list[tuple[float, float, float, float, float]] | None = None

    def waits(self) -> list[tuple[float, float, float, float, float]]:
        """Each job's durations (:func:`~zerver.trace._promotion.job_durations`), on first use."""
        if self._waits is None:
            self._waits = [job_durations(job, self.end) for job in self.record.jobs]
        return self._waits


_Check = Callable[[_Facts, _RouteWindows], bool]


def _error(facts: _Facts, w: _RouteWindows) -> bool:
    return facts.record.status >= 500 or facts.record.system_fault


def _percentile(q: float) -> _Check:
    def check(facts: _Facts, w: _RouteWindows) -> bool:
        if w.duration is None:
            return False  # not reached: the window exists when this trigger is set
        w.duration.expire(facts.end)
        return facts.duration_ms >= w.duration.quantile(q)

    return check


def _latency(bar_ms: float) -> _Check:
    def check(facts: _Facts, w: _RouteWindows) -> bool:
        return facts.duration_ms >= bar_ms

    return check


def _episode_ms(park_ts: int, resume_ts: int | None, end: int) -> float:
    """A park episode's length in ms; one still open at request end lasts until then."""
    resume = resume_ts if resume_ts is not None else end
    return (resume - park_ts) / 1e6 if resume > park_ts else 0.0


def tail_sampler(spec: SamplerSpec, window: Window, *, min_wait_ms: float = 1.0) -> TailSampler:
    """The tail sampler a parsed ``ZER_VER_SAMPLER`` asks for (no triggers: keeps head only)."""
    return TailSampler(spec.tail, window=window, min_wait_ms=min_wait_ms)
