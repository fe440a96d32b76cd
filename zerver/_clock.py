"""Clocks. The runtime reads time only through a :class:`Clock`.

Every lifecycle timestamp is a monotonic nanosecond count from the injected
clock, so tests can drive time with :class:`VirtualClock` instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

__all__ = ["Clock", "MonotonicClock", "VirtualClock"]


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
