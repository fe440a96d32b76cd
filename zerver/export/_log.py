"""Rate-limited structlog warnings: an unreachable backend must not flood the logs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one warning per ``key`` every ``interval_s``; the rest are counted.

    The next warning that passes carries ``suppressed=<n>`` so nothing is
    silently lost.
    """

    __slots__ = ("_clock", "_interval_s", "_last", "_lock", "_logger", "_suppressed")

    def __init__(
        self,
        name: str = "zerver.export",
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = structlog.get_logger(name)
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, event: str, **fields: Any) -> bool:
        """Log ``event`` unless ``key`` was logged within the interval; True if logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        try:
            if suppressed:
                fields["suppressed"] = suppressed
            self._logger.warning(event, **fields)
        except Exception:  # a broken log pipeline must not break export
            return False
        return True
