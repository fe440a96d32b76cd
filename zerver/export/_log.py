"""Rate-limited structlog warnings: an unreachable backend must not flood the logs."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["DropReporter", "RateLimitedLog"]


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


class DropReporter:
    """Logs drops soon after they happen, from a thread of its own.

    A path that drops something (the request path included) counts it and calls
    :meth:`poke`: a flag test, and for the first drop since the last report one
    ``Event.set``. The reporter's daemon thread then reads ``totals()`` and logs
    what changed since its previous line: at most one line per ``interval_s``
    (drops in between are summed into the next line, never left out). The thread
    starts with the first poke, so a pipeline that never drops has none.
    """

    __slots__ = (
        "_closed",
        "_event",
        "_last",
        "_lock",
        "_logger",
        "_message",
        "_poked",
        "_thread",
        "_totals",
        "interval_s",
    )

    def __init__(
        self,
        message: str,
        totals: Callable[[], dict[str, int]],
        *,
        name: str = "zerver.export",
        interval_s: float = 10.0,
    ) -> None:
        self._message = message
        self._totals = totals
        self._logger = structlog.get_logger(name)
        self.interval_s = interval_s
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._poked = False
        self._closed = False
        self._last: dict[str, int] = {}
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        """Something was dropped and counted: have it logged soon. Never blocks long."""
        if self._poked or self._closed:
            return
        self._poked = True
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="zerver-drop-report", daemon=True
                    )
                    self._thread.start()
        self._event.set()

    def report(self) -> bool:
        """Log what changed since the last line now; True if there was anything."""
        with self._lock:
            self._poked = False
            try:
                totals = self._totals()
            except Exception:  # a broken counter must not stop the reporter
                return False
            delta = {k: v - self._last.get(k, 0) for k, v in totals.items()}
            delta = {k: v for k, v in delta.items() if v > 0}
            if not delta:
                return False
            self._last = dict(totals)
        with contextlib.suppress(Exception):  # a broken log pipeline must not break export
            self._logger.warning(
                self._message,
                dropped=delta,
                total={k: v for k, v in totals.items() if v},
            )
        return True

    def close(self) -> None:
        """Log what is left unreported and stop the thread."""
        self._closed = True
        self._event.set()
        self.report()

    def _run(self) -> None:
        next_at = 0.0
        while not self._closed:
            self._event.wait()
            self._event.clear()
            wait = next_at - time.monotonic()
            if wait > 0:
                # Rate limit: later drops are summed into this line.
                self._event.wait(wait)
                self._event.clear()
            if self._closed:
                return
            if self.report():
                next_at = time.monotonic() + self.interval_s
