"""Clocks, and the one token bucket that meters work against a clock reading.

The runtime reads time only through a :class:`Clock`. Every lifecycle
timestamp is a monotonic nanosecond count from the injected clock, so tests
can drive time with :class:`VirtualClock` instead of sleeping.

:class:`TokenBucket` is pure arithmetic on the time its caller passes in
(nanoseconds from a :class:`Clock` for the runtime's
:class:`~zerver.RateLimiter`, seconds for the exporter's rate limit), so one
bucket serves both without reading a clock itself.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

__all__ = ["Clock", "MonotonicClock", "TokenBucket", "VirtualClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of monotonic time and of the wall time it corresponds to."""

    def now_ns(self) -> int:
        """Monotonic nanoseconds; only differences are meaningful."""
        ...

    def wall_ns(self) -> int:
        """Wall-clock nanoseconds since the Unix epoch (for exported timestamps)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock (retry back-off, rate limiting)."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic_ns`` and ``time.time_ns``."""

    __slots__ = ("now_ns", "wall_ns")

    def __init__(self) -> None:
        # Bound once: reading the clock is on every hot path.
        self.now_ns = time.monotonic_ns
        self.wall_ns = time.time_ns

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class VirtualClock:
    """A clock that moves only when told to. Wall time is ``epoch_ns + now``."""

    __slots__ = ("_epoch_ns", "_now")

    def __init__(self, start_ns: int = 0, *, epoch_ns: int = 1_700_000_000_000_000_000) -> None:
        self._now = start_ns
        self._epoch_ns = epoch_ns

    def now_ns(self) -> int:
        return self._now

    def wall_ns(self) -> int:
        return self._epoch_ns + self._now

    def advance(self, ns: int) -> None:
        """Move time forward by ``ns`` nanoseconds (never backwards)."""
        if ns < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {ns} ns)")
        self._now += ns

    def advance_ms(self, ms: float) -> None:
        """Move time forward by ``ms`` milliseconds."""
        self.advance(round(ms * 1_000_000))

    async def sleep(self, seconds: float) -> None:
        """Advance virtual time by ``seconds`` and yield once to other tasks."""
        self.advance(round(max(seconds, 0.0) * 1_000_000_000))
        await anyio.lowlevel.checkpoint()


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity`` (default: one second's worth).

    Two ways to spend, for two kinds of caller:

    * :meth:`try_take` takes tokens only when the balance covers them (a
      :class:`~zerver.RateLimiter` parks a job until :meth:`wait_for` says so);
    * :meth:`charge` may push the balance into debt and :meth:`wait_time` says
      how long until it is paid off, so a batch bigger than the bucket (or
      whose size is known only after sending) still passes and the long-run
      rate stays ``rate``.

    ``now`` is a monotonic reading in units of ``1/ticks_per_s`` seconds:
    ``ticks_per_s=1e9`` for :meth:`Clock.now_ns`, 1.0 for seconds. The bucket
    starts full. Thread-safe (the exporter's threads share one).
    """

    __slots__ = ("_last", "_lock", "_per_tick", "_tokens", "capacity", "rate", "ticks_per_s")

    def __init__(
        self, rate: float, *, capacity: float | None = None, ticks_per_s: float = 1.0
    ) -> None:
        if rate <= 0:
            raise ValueError(f"a token bucket needs rate > 0 (got {rate})")
        if capacity is not None and capacity <= 0:
            raise ValueError(f"a token bucket needs capacity > 0 (got {capacity})")
        if ticks_per_s <= 0:
            raise ValueError(f"a token bucket needs ticks_per_s > 0 (got {ticks_per_s})")
        self.rate = rate
        self.capacity = capacity if capacity is not None else rate
        self.ticks_per_s = ticks_per_s
        self._tokens = float(self.capacity)
        self._last: float | None = None
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        """The balance after the last call (negative while in debt)."""
        return self._tokens

    def _refill(self, now: float) -> None:
        last = self._last
        if last is None:
            self._last = now
        elif now > last:
            self._tokens = min(
                self.capacity, self._tokens + (now - last) * self.rate / self.ticks_per_s
            )
            self._last = now

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if the balance holds them now; never goes into debt."""
        with self._lock:
            self._refill(now)
            if self._tokens >= amount:
                self._tokens -= amount
                return True
            return False

    def wait_for(self, now: float, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens will be there (0.0 if they are now)."""
        with self._lock:
            self._refill(now)
            return max(0.0, (amount - self._tokens) / self.rate)

    def wait_time(self, now: float) -> float:
        """0.0 if the balance is not negative, else the seconds until it will be."""
        with self._lock:
            self._refill(now)
            if self._tokens >= -1e-9:  # tolerance for float refill arithmetic
                return 0.0
            return (-self._tokens) / self.rate

    def charge(self, amount: float, now: float) -> None:
        """Spend ``amount`` tokens now, into debt if need be."""
        with self._lock:
            self._refill(now)
            self._tokens -= amount
