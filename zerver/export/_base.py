"""The contract every exporter layer speaks: results, per-batch context, drop reasons.

An exporter layer is anything with ``export(spans, ctx) -> ExportResult`` and
``shutdown()``. Layers stack (rate limit → circuit breaker → retry → transport)
and never raise for an ordinary failure: they answer with an
:class:`ExportResult` that says whether the batch arrived, may be retried, was
refused for good, or should wait (``DEFERRED``) in the pipeline's bounded buffer.

All time flows through :class:`ExportContext`, which the pipeline builds per
batch from one injected :class:`Timer`, so tests can drive retries, cool-downs
and token buckets without sleeping.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ._spans import SpanData

__all__ = [
    "BatchExporter",
    "BodyTransport",
    "DropReason",
    "ExportContext",
    "ExportResult",
    "ExportStatus",
    "PreEncoder",
    "RealTimer",
    "SpanEncoder",
    "StatsSink",
    "Timer",
    "layers",
]


class ExportStatus(enum.Enum):
    """What happened to one batch."""

    SUCCESS = "success"
    """The backend accepted the batch (possibly with a partial rejection)."""
    RETRYABLE = "retryable"
    """A transient failure (429/502/503/504, connection error); another try may work."""
    PERMANENT = "permanent"
    """The backend refused the batch for good (400 and other codes): drop it."""
    DEFERRED = "deferred"
    """Not attempted (breaker open, rate limit): hold the batch until ``retry_after_s``."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    """The outcome of one ``export`` call."""

    status: ExportStatus
    rejected_spans: int = 0
    """Spans the backend refused inside an otherwise successful answer (``partialSuccess``)."""
    invalid_spans: int = 0
    """Spans the encoder could not represent and skipped (never sent)."""
    bytes_sent: int = 0
    retry_after_s: float | None = None
    """For ``RETRYABLE``: the server's ``Retry-After`` hint; for ``DEFERRED``: how long to wait."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is ExportStatus.SUCCESS


SUCCESS = ExportResult(ExportStatus.SUCCESS)


class DropReason:
    """Why spans were dropped; the keys of ``ExportStats.dropped``."""

    QUEUE_FULL = "queue_full"
    """``drop_newest``: the buffer was full, the new span was refused."""
    EVICTED = "evicted"
    """``drop_oldest``: the buffer was full, the oldest span made room."""
    BLOCK_TIMEOUT = "block_timeout"
    """``block``: the buffer stayed full for the whole block timeout."""
    CLOSED = "closed"
    """Submitted after shutdown began."""
    SHUTDOWN_DEADLINE = "shutdown_deadline"
    """Still buffered (or waiting) when the shutdown deadline passed."""
    EXPORT_FAILED = "export_failed"
    """Transient failures until the batch's deadline or the retry budget ran out."""
    REJECTED = "rejected"
    """The backend refused the batch permanently (400 and other non-retryable codes)."""
    PARTIAL_REJECTED = "partial_rejected"
    """The backend accepted the batch but rejected these spans (``partialSuccess``)."""
    EXPORTER_ERROR = "exporter_error"
    """The exporter raised (a bug or an unencodable span); the batch was dropped."""
    SPOOL_FULL = "spool_full"
    """The batch was bound for the on-disk spool, which refused it (quota full or a
    write error)."""
    ABANDONED = "abandoned"
    """Still buffered or in flight when the process was told to stop at once (a second
    SIGINT/SIGTERM)."""

    ALL = (
        QUEUE_FULL,
        EVICTED,
        BLOCK_TIMEOUT,
        CLOSED,
        SHUTDOWN_DEADLINE,
        EXPORT_FAILED,
        REJECTED,
        PARTIAL_REJECTED,
        EXPORTER_ERROR,
        SPOOL_FULL,
        ABANDONED,
    )


@runtime_checkable
class Timer(Protocol):
    """Monotonic seconds and a wakeable sleep; injected so tests never really wait."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``; may return early after :meth:`wake`."""
        ...

    def wake(self) -> None:
        """End every sleep in progress now (shutdown uses it to cut waits short)."""
        ...


class RealTimer:
    """``time.monotonic`` and a sleep that :meth:`wake` ends early."""

    __slots__ = ("_cond", "_generation")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._generation = 0

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._cond:
            generation = self._generation
            self._cond.wait_for(lambda: self._generation != generation, timeout=seconds)

    def wake(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()


class StatsSink(Protocol):
    """Where layers count what they did (``retries``, ``rate_limited``, ...)."""

    def add(self, name: str, n: int = 1) -> None: ...


class _NullSink:
    __slots__ = ()

    def add(self, name: str, n: int = 1) -> None:
        pass


class ExportContext:
    """One batch's deadline, clock and counters, handed down the exporter layers.

    ``deadline`` is absolute (``timer.monotonic()`` seconds); the pipeline may
    lower it while the batch is in flight (shutdown), so layers re-read it.
    """

    __slots__ = ("deadline", "stats", "timer")

    def __init__(self, timer: Timer, deadline: float, stats: StatsSink | None = None) -> None:
        self.timer = timer
        self.deadline = deadline
        self.stats: StatsSink = stats if stats is not None else _NullSink()

    @classmethod
    def with_timeout(cls, timeout_s: float, timer: Timer | None = None) -> ExportContext:
        """A context whose deadline is ``timeout_s`` from now (for direct exporter use)."""
        t = timer if timer is not None else RealTimer()
        return cls(t, t.monotonic() + timeout_s)

    def now(self) -> float:
        return self.timer.monotonic()

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - self.timer.monotonic())


@runtime_checkable
class BatchExporter(Protocol):
    """An exporter layer. ``export`` must not raise for ordinary failures."""

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class SpanEncoder(Protocol):
    """Turns a batch into one OTLP ``ExportTraceServiceRequest`` body."""

    content_type: str

    def encode(self, spans: Sequence[SpanData]) -> bytes: ...


@runtime_checkable
class PreEncoder(Protocol):
    """A transport that can build a batch's request body ahead of sending it.

    The pipeline calls :meth:`encode_ahead` on its encoder thread and hands the
    result down the layer chain in place of the batch; the transport then sends
    the prepared body instead of encoding on the sending thread. The result must
    still be a ``Sequence[SpanData]`` with the same spans, so layers that look
    at the batch (rate limit by span count, adapters) see no difference.
    """

    def encode_ahead(self, spans: Sequence[SpanData]) -> Sequence[SpanData]: ...


def layers(exporter: object) -> Iterator[object]:
    """Each layer of a chain, outermost first, followed through ``.inner``
    (at most 32, so a chain that loops cannot hang the caller)."""
    for _ in range(32):
        if exporter is None:
            return
        yield exporter
        exporter = getattr(exporter, "inner", None)


@runtime_checkable
class BodyTransport(Protocol):
    """A transport whose request bodies can be stored and sent again later.

    The pipeline's spool keeps a batch as the body this transport would have
    sent (with the headers that describe it), and replays it with
    :meth:`send_body`, possibly in another process after a restart.
    """

    def spool_body(self, spans: Sequence[SpanData]) -> tuple[bytes, dict[str, str], int]:
        """``(body, meta, invalid_spans)`` for ``spans`` (encoded now unless it already was)."""
        ...

    def send_body(
        self, body: bytes, meta: Mapping[str, str], spans: int, ctx: ExportContext
    ) -> ExportResult:
        """One attempt to send a stored body that holds ``spans`` spans."""
        ...
