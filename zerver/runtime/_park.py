"""Park points: how a running job records that it waits, and the limiters that make it wait.

A job *parks* when it stops working without finishing: it waits for a
connection from a pool (``backpressure``), a rate-limit token
(``rate_limit``), a back-off timer (``timer``) or awaited I/O (``io_wait``).
Each wait is one :class:`~zerver.trace._records.ParkEpisode`, opened on park and
closed on resume, even when the wait is cancelled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from zerver.core._clock import TokenBucket
from zerver.trace._records import PARK_CAUSES, JobState, ParkCause, ParkEpisode, RequestRecord

if TYPE_CHECKING:
    from zerver.core._clock import Clock
    from zerver.core._effects import Effect

__all__ = ["ConcurrencyLimiter", "Interpreter", "JobContext", "RateLimiter"]


class _Parked:
    """Closes its episode on exit, unless the job's end closed it already: after a job
    finished (a cancelled worker unwinding) nothing writes to its record."""

    __slots__ = ("_clock", "_episode")

    def __init__(self, clock: Clock, episode: ParkEpisode) -> None:
        self._clock = clock
        self._episode = episode

    def __enter__(self) -> ParkEpisode:
        return self._episode

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        episode = self._episode
        if episode.resume_ts is None:
            episode.resume_ts = self._clock.now_ns()


class JobContext:
    """What an interpreter gets with each effect: the job's record and its clock.

    ``request`` is the record of the request the job works for (``None`` for
    work outside a request).
    """

    __slots__ = ("clock", "request", "state")

    def __init__(self, state: JobState, clock: Clock, request: RequestRecord | None = None) -> None:
        self.state = state
        self.clock = clock
        self.request = request

    def propagation_headers(self) -> dict[str, str]:
        """Headers carrying this job's trace context (``traceparent``, ``tracestate``,
        ``baggage``), with the effect's span as the parent of the receiver's work."""
        carrier: dict[str, str] = {}
        rec = self.request
        if rec is not None and rec.trace_id and self.state.span_id:
            from zerver.trace._propagation import inject

            inject(rec, self.state.span_id, carrier)
        return carrier

    def parked(
        self,
        cause: ParkCause,
        token: str | None = None,
        *,
        limit_current: int | None = None,
        limit_max: int | None = None,
    ) -> _Parked:
        """Record a park episode for the duration of a ``with`` block.

        ``with job.parked("io_wait"): await run_query()`` parks on entry and
        resumes on exit, whether the block finishes, raises or is cancelled.
        """
        if cause not in PARK_CAUSES:
            raise ValueError(f"park cause must be one of {sorted(PARK_CAUSES)}, got {cause!r}")
        episode = ParkEpisode(cause, self.clock.now_ns(), token, limit_current, limit_max)
        if self.state.outcome is None:
            self.state.park_episodes.append(episode)
        else:  # the job already finished: the wait is not recorded
            episode.resume_ts = episode.park_ts
        return _Parked(self.clock, episode)

    def note(self, key: str, value: Any) -> None:
        """Report a fact about the result (``cache.hit``, ``http.response.status_code``).

        Ignored once the job finished (cancelled while its work unwinds)."""
        if self.state.outcome is not None:
            return
        meta = self.state.result_meta
        if meta is None:
            meta = self.state.result_meta = {}
        meta[key] = value


class Wakeup(Protocol):
    """A one-shot signal one task waits on and another sets (``anyio.Event``'s shape)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> None: ...


class _FutureWakeup:
    """A :class:`Wakeup` on a bare asyncio future: ``anyio.Event`` on asyncio asks the
    backend for an ``asyncio.Event`` (a waiter deque and a future of its own) on every
    use, and the job system waits on several of them per request."""

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._future.done()

    async def wait(self) -> None:
        await self._future


def wakeup_factory() -> Callable[[], Wakeup]:
    """How to make a :class:`Wakeup` in the running event loop: a bare future on
    asyncio, an ``anyio.Event`` on any other backend."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return anyio.Event
    return partial(_FutureWakeup, loop)


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        # Made per wait, in the loop the waiter runs in (a limiter may outlive a loop).
        self.event = wakeup_factory()()
        self.granted = False


class ConcurrencyLimiter:
    """At most ``limit`` holders at once; a job that must wait parks with ``backpressure``.

    The park episode carries the limiter's name as token and the occupancy
    (``current``/``max``) seen when the job started waiting. Waiters are
    served in arrival order; a released slot is handed to the next waiter
    directly, so no newcomer can overtake it.

    Why not ``anyio.CapacityLimiter``: on it the same park records (borrower
    per holder, occupancy read before the wait) measured slower, acquire +
    release uncontended 584 ns against 261 ns, one holder and 32 queued
    waiters 1078 µs against 947 µs a round (CPython 3.11, anyio 4.16, asyncio,
    best of 5).
    """

    __slots__ = ("_in_use", "_waiters", "limit", "name")

    def __init__(self, name: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit of {name!r} must be >= 1, got {limit}")
        self.name = name
        self.limit = limit
        self._in_use = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, job: JobContext | None = None) -> None:
        """Take a slot, parking the job while none is free."""
        if self._in_use < self.limit and not self._waiters:
            self._in_use += 1
            return
        waiter = _Waiter()
        self._waiters.append(waiter)
        if job is None:
            await self._wait(waiter)
            return
        with job.parked(
            "backpressure", self.name, limit_current=self._in_use, limit_max=self.limit
        ):
            await self._wait(waiter)

    async def _wait(self, waiter: _Waiter) -> None:
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give the slot back (to the next waiter, if any)."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.event.set()
            return
        if self._in_use <= 0:
            raise RuntimeError(f"limiter {self.name!r} released more often than acquired")
        self._in_use -= 1

    def slot(self, job: JobContext | None = None) -> _LimiterSlot:
        """``async with limiter.slot(job): ...`` acquires and always releases."""
        return _LimiterSlot(self, job)


class _LimiterSlot:
    __slots__ = ("_job", "_limiter")

    def __init__(self, limiter: ConcurrencyLimiter, job: JobContext | None) -> None:
        self._limiter = limiter
        self._job = job

    async def __aenter__(self) -> None:
        await self._limiter.acquire(self._job)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._limiter.release()


class RateLimiter:
    """A park point over a :class:`~zerver.core._clock.TokenBucket`: ``rate`` tokens per
    second, bursts up to ``burst``.

    A job that finds the bucket empty parks with ``rate_limit`` (token: the
    limiter's name) for exactly as long as the next token takes, measured on
    the injected clock.
    """

    __slots__ = ("_bucket", "_clock", "burst", "name", "rate")

    def __init__(self, name: str, rate: float, burst: float, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limiter {name!r} needs rate > 0 and burst >= 1")
        self.name = name
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._bucket = TokenBucket(rate, capacity=burst, ticks_per_s=1e9)

    def try_acquire(self) -> bool:
        """Take a token if one is available now."""
        return self._bucket.try_take(self._clock.now_ns())

    async def acquire(self, job: JobContext | None = None) -> None:
        """Take a token, parking the job until one is available."""
        clock = self._clock
        bucket = self._bucket
        while not bucket.try_take(now := clock.now_ns()):
            wait_s = bucket.wait_for(now)
            if job is None:
                await clock.sleep(wait_s)
            else:
                with job.parked("rate_limit", self.name):
                    await clock.sleep(wait_s)


class Interpreter(Protocol):
    """Performs the effects of one system (``db``, ``cache``, ``http``, ...).

    ``perform`` returns the value that lands in the effect's slot, or raises
    :class:`~zerver.EffectError` (``retryable=True`` for failures another
    attempt may cure). It records waits with ``job.parked(...)``. ``start``
    runs when the app starts, ``aclose`` when it stops.

    While ``perform`` runs, the effect's span is the current OpenTelemetry span,
    so spans the interpreter makes through the OpenTelemetry API nest under it.
    An interpreter that never makes any says so with a class attribute
    ``otel_spans = False``, and is spared the context switch (a few µs an effect).
    One whose ``perform`` never waits (no I/O, no lock: the in-process cache) may
    say ``synchronous = True``: its attempts then run without a timeout scope.
    """

    async def start(self) -> None: ...

    async def perform(self, effect: Effect, job: JobContext) -> Any: ...

    async def aclose(self) -> None: ...
