"""The export pipeline: a cheap ``submit`` into a bounded buffer, a worker thread
that batches and exports, counters for everything.

Rules of the hand-off (the request path only ever runs ``submit``):

- ``submit`` appends to a ``collections.deque`` (atomic under the GIL) and
  takes no lock on the fast path; it wakes the worker only when a full batch
  is waiting. It never raises and never does I/O.
- The buffer holds ``max_queue_size`` spans. When it is full the overflow
  policy decides, and every refused span is counted by reason. Concurrent
  producers may overshoot the bound by at most one span each (the check and
  the append are two steps); nothing grows without bound.
- The worker takes up to ``max_export_batch_size`` spans when that many
  are waiting, when ``schedule_delay_s`` has passed since the last export, or at
  once on ``force_flush``/``shutdown``. It converts SDK spans, groups the batch
  by trace (stable: first-seen order, so each trace's spans stay in submission
  order), and calls the exporter chain with a deadline of ``export_timeout_s``.
- An exporter answering ``DEFERRED`` (breaker open, rate limit) makes the
  worker hold the batch and wait; it takes nothing more meanwhile, so the
  buffer fills and the overflow policy applies, bounded.

Two stages when the transport can encode ahead (:class:`PreEncoder`, i.e. the
OTLP/HTTP exporter)::

    buffer ─► encoder thread: take, convert, group, encode ─► hand-off (≤ encode_ahead
              batches, FIFO) ─► sender thread: rate limit ─► breaker ─► retry ─► POST

Measured (``loadtest/bench_export.py``): with one worker, a 512-span JSON
batch costs ~2 ms of encoding and then ~2-3 ms waiting for the receiver's
answer, serially; the wait releases the GIL, so encoding batch N+1 during the
POST of batch N hides most of the encoding. The two threads share the GIL
through a :class:`~zerver.export._handover.Handover` when the transport
offers one: the encoder steps aside while the sender has work, so the sender
is not kept waiting for the GIL until a whole batch is encoded. The hand-off
is bounded (``encode_ahead`` batches, default 1) and the encoder takes a batch from the
buffer only when the hand-off has room, so at most ``encode_ahead + 1``
batches are out of the buffer (one sending, the rest encoded and waiting);
while the breaker holds a batch, spans wait in the buffer as before. One
encoder and one sender over a FIFO keep batch order, hence per-producer
order. Exporters that cannot encode ahead (in-memory, console, fan-out, test
doubles) keep the single worker: a second thread would buy them nothing.
- ``shutdown`` refuses new spans (``closed``), drains within its deadline,
  counts what is left as ``shutdown_deadline`` and reports it.

Why a thread, not a process: handing a span to another process costs a
pickle (≈4 µs per span, measured in ``loadtest/bench_export.py``), as much as
encoding it, so a process would not unload the event loop's core. The worker
releases the GIL during network I/O, and yields it between batches.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import anyio.to_thread
import structlog
from opentelemetry.sdk.trace import ReadableSpan

from zerver.core._effects import RetryPolicy

from ._base import (
    BatchExporter,
    BodyTransport,
    DropReason,
    ExportContext,
    ExportResult,
    ExportStatus,
    PreEncoder,
    RealTimer,
    Timer,
    layers,
)
from ._config import ExportConfig, Overflow
from ._handover import Handover
from ._log import DropReporter, RateLimitedLog
from ._otel import span_from_readable
from ._resilience import EXPORT_RETRY, find_breaker, find_rate_limiter
from ._simple import describe_destination
from ._spans import SpanData

if TYPE_CHECKING:
    from ._spool import Spool, SpoolItem, SpoolStats

__all__ = ["Counters", "ExportPipeline", "ExportStats", "ShutdownReport"]

INVALID = "invalid"
_DROP_REASONS = frozenset((*DropReason.ALL, INVALID))

# Hand-off items: ``(spans, n)`` where ``n`` counts the spans taken from the
# buffer (SDK spans that failed conversion included) and ``spans`` is what to
# send, or None when the encoder already settled them (encoding raised).
_Item = tuple[Sequence[SpanData] | None, int]
_STOP: _Item = (None, -1)
_PAST_DEADLINE = ExportResult(ExportStatus.DEFERRED, detail="shutdown deadline passed")


def _group_by_trace(spans: list[SpanData]) -> list[SpanData]:
    groups: dict[int, list[SpanData]] = {}
    for s in spans:
        members = groups.get(s.trace_id)
        if members is None:
            groups[s.trace_id] = [s]
        else:
            members.append(s)
    if len(groups) == len(spans):
        return spans
    return [s for members in groups.values() for s in members]


def find_body_transport(exporter: object) -> BodyTransport | None:
    """The transport at the bottom of a layer chain, if its bodies can be spooled."""
    return next((layer for layer in layers(exporter) if isinstance(layer, BodyTransport)), None)


def find_pre_encoder(exporter: object) -> PreEncoder | None:
    """The transport at the bottom of a layer chain, if it can encode ahead.

    The resilience layers pass the batch object on unchanged, so a pre-encoded
    batch reaches the transport intact.
    """
    return next((layer for layer in layers(exporter) if isinstance(layer, PreEncoder)), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportStats:
    """A snapshot of the pipeline's counters (exact once the pipeline is idle).

    ``submitted == exported + spooled + dropped_total + queue_depth + in_flight``.
    """

    submitted: int
    exported: int
    """Spans the backend accepted (partial rejections excluded)."""
    spooled: int = 0
    """Spans written to the on-disk spool instead of being sent (backend down, asked
    to wait, or shutting down); they are sent later by :attr:`replayed`."""
    replayed: int = 0
    """Spans read back from the spool and accepted by the backend (these may have
    been spooled by an earlier process)."""
    spool: SpoolStats | None = None
    """The spool's own counters (``None`` without a spool)."""
    dropped: Mapping[str, int]
    """Dropped spans by reason (see :class:`DropReason`; ``invalid`` = unencodable)."""
    queue_depth: int
    queue_capacity: int
    in_flight: int
    """Spans taken by the worker and not yet exported or dropped."""
    batches_exported: int
    batches_failed: int
    """Batches dropped after transient failures outlasted retries or deadline."""
    permanent_failures: int
    """Batches refused permanently (HTTP 400 and other non-retryable codes)."""
    retries: int
    partial_rejections: int
    """Spans the backend rejected inside successful answers (``partialSuccess``)."""
    rate_limited: int
    """Times a batch waited for the rate limiter."""
    breaker_state: str
    """``closed``, ``open``, ``half_open`` or ``disabled``."""
    breaker_openings: int
    bytes_sent: int
    export_latency_last_ms: float
    export_latency_avg_ms: float
    export_latency_max_ms: float

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownReport:
    """What :meth:`ExportPipeline.shutdown` achieved."""

    completed: bool
    """True if everything was exported, spooled or dropped for a reason before the deadline."""
    not_sent: int
    """Spans that were neither sent nor spooled because the deadline passed."""
    spooled: int = 0
    """Spans this pipeline left in the spool (sent at the next start)."""
    stats: ExportStats = field(repr=False)


class Counters:
    """Worker- and layer-side counters; the lock keeps cross-thread adds exact."""

    __slots__ = ("_lock", "values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0) + n


class ExportPipeline:
    """Buffers finished spans and exports them in batches on a worker thread
    (an encoder and a sender thread when the transport can encode ahead).

    Accepts :class:`~zerver.export._spans.SpanData` and OpenTelemetry SDK
    ``ReadableSpan`` objects (converted on the worker).

    ``encode_ahead``: how many encoded batches may wait between the encoder
    and the sender thread (default 1: batch N+1 is encoded while batch N is
    sent). 0 = a single worker that encodes and sends in turn.

    ``announce_after_s``: when ``shutdown`` has not settled every span after this
    long, it logs what it still waits for (``flushing N spans to <endpoint>, up to
    Ns``).

    Example::

        pipeline = ExportPipeline.from_config(ExportConfig.from_env())
        pipeline.submit(span)            # on the request path: cheap, never raises
        pipeline.stats().dropped         # counters, any time
        pipeline.shutdown(timeout=5.0)   # drain, then stop
    """

    def __init__(
        self,
        exporter: BatchExporter,
        *,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay_s: float = 5.0,
        export_timeout_s: float = 30.0,
        overflow: Overflow = Overflow.DROP_NEWEST,
        block_timeout_s: float = 0.5,
        timer: Timer | None = None,
        log: RateLimitedLog | None = None,
        thread_name: str = "zerver-export",
        encode_ahead: int = 1,
        spool: Spool | None = None,
        rebuild: Callable[[SpoolItem], Sequence[SpanData]] | None = None,
        retry_policy: RetryPolicy | None = None,
        replay: bool = True,
        announce_after_s: float = 0.25,
    ) -> None:
        if max_queue_size < 1 or max_export_batch_size < 1:
            raise ValueError("max_queue_size and max_export_batch_size must be >= 1")
        if max_export_batch_size > max_queue_size:
            raise ValueError(
                f"max_export_batch_size ({max_export_batch_size}) exceeds "
                f"max_queue_size ({max_queue_size})"
            )
        if schedule_delay_s < 0 or export_timeout_s <= 0 or block_timeout_s < 0:
            raise ValueError("schedule_delay_s, block_timeout_s >= 0 and export_timeout_s > 0")
        if encode_ahead < 0:
            raise ValueError("encode_ahead must be >= 0")
        transport = find_body_transport(exporter)
        if spool is not None and (transport is None or find_pre_encoder(exporter) is None):
            raise ValueError("a spool needs an OTLP transport at the bottom of the exporter chain")
        if spool is not None and encode_ahead < 1:
            raise ValueError("a spool needs the two-stage pipeline (encode_ahead >= 1)")
        self._exporter = exporter
        self._breaker = find_breaker(exporter)
        self._capacity = max_queue_size
        self._limit = max_queue_size  # set to -1 at shutdown: sends every submit to the slow path
        self._batch_size = max_export_batch_size
        # With no schedule delay, wake on every span rather than poll.
        self._wake_at = max_export_batch_size if schedule_delay_s > 0 else 1
        self._schedule_delay_s = schedule_delay_s
        self._export_timeout_s = export_timeout_s
        self._announce_after_s = announce_after_s
        self._block_timeout_s = block_timeout_s
        self._overflow = overflow
        self._timer: Timer = timer if timer is not None else RealTimer()
        self._log = log or RateLimitedLog()

        self._q: deque[SpanData | ReadableSpan] = deque()
        self._wake = threading.Event()
        self._signalled = False
        self._room = threading.Condition(threading.Lock())
        self._blocked = 0
        self._submit_lock = threading.Lock()
        self._submit_drops: dict[str, int] = {}

        self._counters = Counters()
        self._taken = 0  # written by the encoder (or the single worker) only
        self._done = 0  # written under _done_lock: sender and encoder both settle spans
        self._done_lock = threading.Lock()
        self._latency_sum = 0.0
        self._latency_max = 0.0
        self._latency_last = 0.0

        self._flush_lock = threading.Lock()
        self._flush_waiters: list[tuple[int, threading.Event]] = []
        self._closed = False
        self._stop_at: float | None = None
        self._ctx: ExportContext | None = None
        self._report: ShutdownReport | None = None
        self._drops = DropReporter("spans dropped", self._dropped_totals)

        # The spool (see "Spooling" in the module docstring); the sender thread alone
        # reads and writes this state.
        self._spool = spool
        self._owns_spool = False  # from_config opens a spool it then closes at shutdown
        self._transport = transport if spool is not None else None
        self._limiter = find_rate_limiter(exporter)
        self._rebuild = rebuild
        self._replay_kinds = ("otlp", "records") if rebuild is not None else ("otlp",)
        self._retry_policy = retry_policy or EXPORT_RETRY
        self._failures = 0  # consecutive failed attempts (live or replayed)
        self._hold_until = 0.0  # no attempt before this: back-off or the backend's Retry-After
        self._down_at_shutdown = False  # an attempt failed while shutting down: spool the rest
        self._replay = replay
        self._spool_waiting = spool is not None  # the spool may hold something to replay
        self._next_spool_check = 0.0

        submit = {
            Overflow.DROP_NEWEST: self._submit_drop_newest,
            Overflow.DROP_OLDEST: self._submit_drop_oldest,
            Overflow.BLOCK: self._submit_block,
        }[overflow]
        self.submit = submit  # type: ignore[method-assign]

        self._pre_encoder = find_pre_encoder(exporter) if encode_ahead else None
        self._handoff: deque[_Item] = deque()
        self._handoff_depth = encode_ahead
        self._handoff_cond = threading.Condition(threading.Lock())
        self._sender_gone = False
        self._sender_idle = False  # the sender waits for the hand-off (under _handoff_cond)
        handover = getattr(self._pre_encoder, "handover", None)
        self._handover = handover if isinstance(handover, Handover) else None
        self._encode_thread: threading.Thread | None = None
        if self._pre_encoder is not None:
            # ``_thread`` is the sender: the last stage to finish.
            self._thread = threading.Thread(target=self._run_sender, name=thread_name, daemon=True)
            self._encode_thread = threading.Thread(
                target=self._run_encoder, name=f"{thread_name}-encode", daemon=True
            )
            self._thread.start()
            self._encode_thread.start()
        else:
            self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
            self._thread.start()

    @classmethod
    def from_config(
        cls,
        config: ExportConfig,
        *,
        exporter: BatchExporter | None = None,
        timer: Timer | None = None,
        rebuild: Callable[[SpoolItem], Sequence[SpanData]] | None = None,
        replay: bool = True,
    ) -> ExportPipeline:
        """A pipeline with ``config``'s buffer, batching, overflow and spool settings.

        Without ``exporter`` one is built from ``OTEL_TRACES_EXPORTER``: the
        resilient OTLP/HTTP exporter, the console exporter, both, or none. With
        ``config.spool_dir`` and the OTLP exporter alone, batches that cannot be
        sent now go to a :class:`~zerver.export.Spool` there; ``rebuild`` turns
        spooled request records (from the exporter process) back into spans;
        ``replay=False`` leaves replaying the spool to another pipeline.
        """
        spool = None
        if exporter is None:
            from ._factory import build_exporter

            if config.spool_dir is not None and config.exporters == ("otlp",):
                from ._spool import Spool

                spool = Spool(config.spool_dir, max_bytes=config.spool_max_bytes)
            # With a spool, failed batches are retried by replaying them from disk.
            exporter = build_exporter(config, retry=spool is None)
        pipeline = cls(
            exporter,
            max_queue_size=config.max_queue_size,
            max_export_batch_size=config.max_export_batch_size,
            schedule_delay_s=config.schedule_delay_s,
            export_timeout_s=config.export_timeout_s,
            overflow=config.overflow,
            block_timeout_s=config.block_timeout_s,
            timer=timer,
            spool=spool,
            rebuild=rebuild if spool is not None else None,
            replay=replay,
        )
        pipeline._owns_spool = spool is not None
        return pipeline

    @property
    def spool(self) -> Spool | None:
        """The on-disk spool, if this pipeline has one."""
        return self._spool

    @property
    def settled(self) -> int:
        """Spans taken from the buffer and finished (exported, spooled or dropped and
        counted). Batches settle in submission order, so the first ``settled`` spans
        ever submitted (refusals aside) are the settled ones."""
        return self._done

    def backing_off(self) -> bool:
        """Whether the backend is known to be unavailable now (a failed attempt not yet
        followed by a success, an open breaker, or a failure during shutdown)."""
        now = self._timer.monotonic()
        return (
            self._down_at_shutdown
            or now < self._hold_until
            or (self._breaker is not None and self._breaker.remaining(now) > 0)
        )

    def wait_for_room(self, spans: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until ``spans`` more spans fit in the buffer.

        For producers that are not a request's path (the exporter process's builder):
        they wait here instead of having spans refused. False on time-out or shutdown.
        """
        return len(self._q) + spans <= self._limit or self._await_room(spans, timeout) is None

    def _await_room(self, spans: int, timeout: float) -> str | None:
        """Wait up to ``timeout`` until ``spans`` more fit; None once they do, else why
        not (``closed`` or ``block_timeout``)."""
        deadline = time.monotonic() + timeout
        with self._room:
            self._blocked += 1
            try:
                while len(self._q) + spans > self._limit:
                    if self._closed:
                        return DropReason.CLOSED
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return DropReason.BLOCK_TIMEOUT
                    self._signalled = True
                    self._wake.set()  # the worker takes a batch, which makes room
                    self._room.wait(remaining)
            finally:
                self._blocked -= 1
        return None

    # -- submit (request path) --------------------------------------------------

    def submit(self, span: SpanData | ReadableSpan) -> None:
        """Hand a finished span to the pipeline. Cheap; never blocks (except with
        ``Overflow.BLOCK``), never raises. Replaced per instance by the variant
        for the configured overflow policy."""
        raise NotImplementedError  # pragma: no cover

    def _submit_drop_newest(self, span: SpanData | ReadableSpan) -> None:
        q = self._q
        if len(q) >= self._limit:
            self._refuse(DropReason.CLOSED if self._closed else DropReason.QUEUE_FULL)
            return
        q.append(span)
        if len(q) >= self._wake_at and not self._signalled:
            self._signalled = True
            self._wake.set()

    def _submit_drop_oldest(self, span: SpanData | ReadableSpan) -> None:
        q = self._q
        if len(q) >= self._limit:
            if self._closed:
                self._refuse(DropReason.CLOSED)
                return
            try:
                q.popleft()
            except IndexError:
                pass  # the worker emptied it meanwhile
            else:
                self._refuse(DropReason.EVICTED)
        q.append(span)
        if len(q) >= self._wake_at and not self._signalled:
            self._signalled = True
            self._wake.set()

    def _submit_block(self, span: SpanData | ReadableSpan) -> None:
        q = self._q
        if len(q) >= self._limit and not self._wait_for_room():
            return
        q.append(span)
        if len(q) >= self._wake_at and not self._signalled:
            self._signalled = True
            self._wake.set()

    def _wait_for_room(self) -> bool:
        try:
            refused = self._await_room(1, self._block_timeout_s)
        except Exception:  # telemetry never raises into the request
            return False
        if refused is not None:
            self._refuse(refused)
            return False
        return True

    def _refuse(self, reason: str) -> None:
        with self._submit_lock:
            self._submit_drops[reason] = self._submit_drops.get(reason, 0) + 1
        self._drops.poke()

    def _dropped_totals(self) -> dict[str, int]:
        with self._submit_lock:
            totals = dict(self._submit_drops)
        for reason, n in self._counters.values.copy().items():
            if reason in _DROP_REASONS:
                totals[reason] = totals.get(reason, 0) + n
        return totals

    # -- worker -------------------------------------------------------------------

    def _settle(self, n: int) -> None:
        with self._done_lock:
            self._done += n

    def _run(self) -> None:
        """The single worker: take, prepare, export, repeat."""
        try:
            next_due = self._timer.monotonic() + self._schedule_delay_s
            while True:
                batch = self._next_batch(next_due)
                if batch is None:
                    return
                if batch:
                    spans = self._prepare(batch)
                    if spans:
                        self._export(spans)
                    self._settle(len(batch))
                    time.sleep(0)  # let the event loop thread have the GIL between batches
                next_due = self._timer.monotonic() + self._schedule_delay_s
                self._release_flushers()
        except BaseException as exc:  # pragma: no cover - a bug; keep the process alive
            self._log.warning("worker_crash", "export worker stopped", error=repr(exc))
        finally:
            self._release_flushers(everything=True)

    def _run_encoder(self) -> None:
        """Stage 1: take a batch when the hand-off has room, prepare and encode it."""
        pre_encoder = self._pre_encoder
        assert pre_encoder is not None
        cond = self._handoff_cond
        handoff = self._handoff
        try:
            next_due = self._timer.monotonic() + self._schedule_delay_s
            while True:
                # Wait for room *before* taking: spans the sender cannot take yet
                # (breaker open, slow backend) stay in the buffer, where the
                # overflow policy and the queue_depth counter see them.
                with cond:
                    while len(handoff) >= self._handoff_depth and not self._sender_gone:
                        cond.wait()
                    if self._sender_gone:
                        return
                batch = self._next_batch(next_due)
                if batch is None:
                    return
                if batch:
                    spans = self._prepare(batch)
                    item: _Item
                    if not spans:
                        item = (None, len(batch))
                    else:
                        try:
                            item = (pre_encoder.encode_ahead(spans), len(batch))
                        except Exception as exc:
                            self._drop(DropReason.EXPORTER_ERROR, len(spans))
                            self._log.warning(
                                "exporter_error", "encoder raised; batch dropped", error=repr(exc)
                            )
                            item = (None, len(batch))
                    with cond:
                        handoff.append(item)
                        cond.notify_all()
                        if self._sender_idle and self._handover is not None:
                            self._handover.woke_sender()
                    time.sleep(0)  # let the event loop thread have the GIL between batches
                next_due = self._timer.monotonic() + self._schedule_delay_s
                self._release_flushers()
        except BaseException as exc:  # pragma: no cover - a bug; keep the process alive
            self._log.warning("worker_crash", "export encoder stopped", error=repr(exc))
        finally:
            with cond:
                handoff.append(_STOP)
                cond.notify_all()

    def _run_sender(self) -> None:
        """Stage 2: send encoded batches in hand-off (= buffer) order; replay the
        spool while there is nothing new to send."""
        cond = self._handoff_cond
        handoff = self._handoff
        handover = self._handover
        try:
            while True:
                with cond:
                    if not handoff:
                        wait = self._replay_wait()
                        if wait == 0.0:
                            item = None
                        else:
                            if handover is not None:
                                handover.blocking()
                            self._sender_idle = True
                            cond.wait(wait)
                            self._sender_idle = False
                            continue
                    else:
                        item = handoff.popleft()
                        cond.notify_all()  # room for the encoder
                if item is None:
                    self._replay_one()
                    continue
                if item is _STOP:
                    return
                spans, n = item
                if spans:
                    self._export(spans)
                self._settle(n)
                self._release_flushers()
        except BaseException as exc:  # pragma: no cover - a bug; keep the process alive
            self._log.warning("worker_crash", "export sender stopped", error=repr(exc))
        finally:
            with cond:
                self._sender_gone = True
                cond.notify_all()
            self._release_flushers(everything=True)

    def _next_batch(self, next_due: float) -> list[SpanData | ReadableSpan] | None:
        """Wait until a batch is due, then take it; ``[]`` = nothing due; None = stop."""
        q = self._q
        while True:
            self._signalled = False
            self._wake.clear()
            if len(q) >= self._batch_size or self._closed:
                break
            # A flush needs this thread if spans wait in the buffer, or if nothing
            # is in flight (then no sender will settle a batch and release the
            # flusher). Otherwise the sender releases it: the encoder must not spin.
            if self._flush_waiters and (q or self._done >= self._taken):
                break
            if self._schedule_delay_s == 0:
                if q:
                    break
                self._wake.wait()
                continue
            timeout = next_due - self._timer.monotonic()
            if timeout <= 0:
                break
            self._wake.wait(timeout)
        n = min(len(q), self._batch_size)
        if n == 0:
            if self._closed:
                return None
            return []
        if (
            self._spool is None
            and self._stop_at is not None
            and self._timer.monotonic() >= self._stop_at
        ):
            self._drop_rest()
            return None
        self._taken += n  # before popping: a concurrent force_flush may overcount, never under
        popleft = q.popleft
        batch: list[SpanData | ReadableSpan] = []
        append = batch.append
        try:
            for _ in range(n):
                append(popleft())
        except IndexError:  # drop_oldest producers evicted some meanwhile
            self._taken -= n - len(batch)
        if self._blocked:
            with self._room:
                self._room.notify_all()
        return batch

    def _drop_rest(self) -> None:
        q = self._q
        n = 0
        while True:
            try:
                q.popleft()
            except IndexError:
                break
            n += 1
        self._taken += n
        self._settle(n)
        self._drop(DropReason.SHUTDOWN_DEADLINE, n)

    def _prepare(self, batch: list[SpanData | ReadableSpan]) -> list[SpanData]:
        """Convert SDK spans and group by trace, keeping first-seen order.

        A request's spans are submitted together, so a batch is usually grouped
        already: one pass checks that (a trace id seen before, after another
        one, means it is not) and the batch is then used as it is.
        """
        seen: set[int] = set()
        last = None
        grouped = True
        for s in batch:
            if type(s) is not SpanData:
                return self._convert_and_group(batch)
            trace_id = s.trace_id
            if trace_id != last:
                if trace_id in seen:
                    grouped = False
                    break
                seen.add(trace_id)
                last = trace_id
        spans: list[SpanData] = batch  # type: ignore[assignment]  # all SpanData, checked above
        return spans if grouped else _group_by_trace(spans)

    def _convert_and_group(self, batch: list[SpanData | ReadableSpan]) -> list[SpanData]:
        spans: list[SpanData] = []
        bad = 0
        for s in batch:
            if type(s) is SpanData:
                spans.append(s)
                continue
            try:
                spans.append(span_from_readable(s))  # type: ignore[arg-type]
            except Exception:
                bad += 1
        if bad:
            self._drop(INVALID, bad)
        return _group_by_trace(spans)

    def _export(self, spans: Sequence[SpanData]) -> None:
        if self._spool is not None:
            self._export_or_spool(spans)
            return
        started = self._timer.monotonic()
        stop_at = self._stop_at
        if stop_at is not None and started >= stop_at:
            self._drop(DropReason.SHUTDOWN_DEADLINE, len(spans))
            return
        result = self._attempt(spans, spool_on_open_breaker=False)
        if result is _PAST_DEADLINE:
            self._drop(DropReason.SHUTDOWN_DEADLINE, len(spans))
        elif result is not None:
            self._record_latency(started)
            self._account(result, len(spans))

    def _attempt(
        self, spans: Sequence[SpanData], *, spool_on_open_breaker: bool
    ) -> ExportResult | None:
        """Run the exporter chain once over ``spans`` within the batch deadline (the
        shutdown deadline at the latest), waiting out ``DEFERRED`` answers: the rate
        limit always, an open breaker unless ``spool_on_open_breaker`` (then the
        ``DEFERRED`` result is returned). ``_PAST_DEADLINE`` when the shutdown deadline
        passed while waiting; None if the exporter raised (dropped, counted)."""
        timer = self._timer
        while True:
            now = timer.monotonic()
            deadline = now + self._export_timeout_s
            stop_at = self._stop_at
            if stop_at is not None:
                if now >= stop_at:
                    return _PAST_DEADLINE
                deadline = min(deadline, stop_at)
            ctx = self._ctx = ExportContext(timer, deadline, self._counters)
            try:
                result = self._exporter.export(spans, ctx)
            except Exception as exc:
                self._drop(DropReason.EXPORTER_ERROR, len(spans))
                self._log.warning(
                    "exporter_error", "exporter raised; batch dropped", error=repr(exc)
                )
                return None
            finally:
                self._ctx = None
            if result.status is not ExportStatus.DEFERRED:
                return result
            breaker = self._breaker
            if spool_on_open_breaker and breaker is not None and breaker.remaining(ctx.now()):
                return result
            wait = result.retry_after_s if result.retry_after_s else 0.01
            if stop_at is not None:
                wait = min(wait, stop_at - timer.monotonic())
            timer.sleep(wait)

    def _record_latency(self, started: float) -> None:
        elapsed = max(0.0, self._timer.monotonic() - started) * 1000.0
        self._latency_last = elapsed
        self._latency_sum += elapsed
        self._latency_max = max(self._latency_max, elapsed)

    # -- spooling (sender thread) ---------------------------------------------------

    def _export_or_spool(self, spans: Sequence[SpanData], *, replay: bool = False) -> None:
        """Send ``spans`` once, or put them in the spool: no attempt is made while the
        backend asked to wait or is backing off, while the breaker is open, or once an
        attempt failed during shutdown; a failed attempt spools the batch and backs off."""
        now = self._timer.monotonic()
        stop_at = self._stop_at
        if (
            now < self._hold_until
            or self._down_at_shutdown
            or (stop_at is not None and now >= stop_at)
            or (self._breaker is not None and self._breaker.remaining(now) > 0)
        ):
            self._to_spool(spans, replay=replay)
            return
        result = self._attempt(spans, spool_on_open_breaker=True)
        if result is None:
            return
        self._record_latency(now)
        if result.status is ExportStatus.RETRYABLE:
            self._attempt_failed(result)
        if result.status in (ExportStatus.RETRYABLE, ExportStatus.DEFERRED):
            self._to_spool(spans, replay=replay)
            return
        self._attempt_succeeded()
        self._account(result, len(spans), "replayed" if replay else "exported")

    def _attempt_failed(self, result: ExportResult) -> None:
        """Back off before the next attempt; the backend's Retry-After is a floor."""
        self._failures += 1
        now = self._timer.monotonic()
        policy = self._retry_policy
        delay = policy.delay_ms(self._failures, random.random()) / 1000.0
        if result.retry_after_s is not None:
            delay = max(delay, result.retry_after_s, policy.min_retry_after_ms / 1000.0)
        self._hold_until = now + delay
        if self._closed:
            self._down_at_shutdown = True
        self._log.warning(
            "export_spooling",
            "otlp export failed; spooling batches until the backend answers",
            detail=result.detail,
            retry_in_s=round(delay, 3),
        )

    def _attempt_succeeded(self) -> None:
        self._failures = 0
        self._hold_until = 0.0

    def _to_spool(self, spans: Sequence[SpanData], *, replay: bool = False) -> None:
        """Put ``spans`` in the spool as the body the transport would send. ``replay``:
        they came out of the spool (as records) and go back in, so not counted again."""
        assert self._spool is not None and self._transport is not None
        n = len(spans)
        try:
            body, meta, invalid = self._transport.spool_body(spans)
        except Exception as exc:
            self._drop(DropReason.EXPORTER_ERROR, n)
            self._log.warning("exporter_error", "encoder raised; batch dropped", error=repr(exc))
            return
        if invalid:
            self._drop(INVALID, min(invalid, n))
            n -= min(invalid, n)
        if not n:
            return
        if self._spool.put("otlp", body, n, meta):
            if not replay:
                self._counters.add("spooled", n)
            self._spool_waiting = True
        else:
            self._drop(DropReason.SPOOL_FULL, n)  # the spool logged why

    def _replay_wait(self) -> float | None:
        """0.0: replay a spooled item now; > 0: seconds until one may be tried (or the
        spool is looked at again, for items other processes wrote); None: never (no
        spool, or shutting down)."""
        spool = self._spool
        if spool is None or self._closed or not self._replay:
            return None
        now = self._timer.monotonic()
        if now >= self._next_spool_check:
            # Items may come from elsewhere (the exporter process's parent, another
            # worker, the previous run): look now and then even when none was written here.
            self._next_spool_check = now + 1.0
            self._spool_waiting = spool.pending(self._replay_kinds) > 0
        if not self._spool_waiting:
            return max(0.001, self._next_spool_check - now)
        wait = self._hold_until - now
        if self._breaker is not None:
            wait = max(wait, self._breaker.remaining(now))
        if self._limiter is not None:
            wait = max(wait, self._limiter.delay(now))
        return 0.0 if wait <= 0 else wait

    def _replay_one(self) -> None:
        """Send the oldest spooled item once; on failure it goes back, and we back off."""
        spool = self._spool
        assert spool is not None and self._transport is not None
        item = spool.claim(self._replay_kinds)
        if item is None:
            self._spool_waiting = False
            return
        if item.kind == "records":
            self._replay_records(item)
            return
        timer = self._timer
        now = timer.monotonic()
        if self._breaker is not None and self._breaker.before_call(now) > 0:
            spool.release(item)
            return
        if self._limiter is not None:
            self._limiter.charge_spans(item.count, now)
        ctx = ExportContext(timer, now + self._export_timeout_s, self._counters)
        try:
            result = self._transport.send_body(item.body, item.meta, item.count, ctx)
        except Exception as exc:  # a bug: keep the item, try again later
            result = ExportResult(ExportStatus.RETRYABLE, detail=f"transport raised: {exc!r}")
        if self._limiter is not None:
            self._limiter.charge_bytes(result.bytes_sent, timer.monotonic())
        if self._breaker is not None:
            if result.status is ExportStatus.RETRYABLE:
                self._breaker.on_failure(timer.monotonic())
            else:
                self._breaker.on_success()
        if result.status is ExportStatus.RETRYABLE:
            spool.release(item)
            self._attempt_failed(result)
            return
        spool.ack(item)
        self._attempt_succeeded()
        if result.status is ExportStatus.SUCCESS:
            rejected = min(result.rejected_spans, item.count)
            self._counters.add("replayed", item.count - rejected)
            self._counters.add("bytes_sent", result.bytes_sent)
            if rejected:
                self._drop(DropReason.PARTIAL_REJECTED, rejected)
        else:
            self._drop(DropReason.REJECTED, item.count)
            self._counters.add("permanent_failures")

    def _replay_records(self, item: SpoolItem) -> None:
        """Rebuild spooled request records into spans and send (or spool) them."""
        assert self._spool is not None and self._rebuild is not None
        try:
            spans = self._rebuild(item)
        except Exception as exc:
            self._spool.ack(item)
            self._drop(INVALID, item.count)
            self._log.warning(
                "records_unreadable", "spooled records could not be rebuilt", error=repr(exc)
            )
            return
        for start in range(0, len(spans), self._batch_size):
            self._export_or_spool(list(spans[start : start + self._batch_size]), replay=True)
        self._spool.ack(item)

    def _drop(self, reason: str, n: int) -> None:
        self._counters.add(reason, n)
        self._drops.poke()

    def _account(self, result: ExportResult, n: int, exported: str = "exported") -> None:
        counters = self._counters
        invalid = min(result.invalid_spans, n)
        if invalid:
            self._drop(INVALID, invalid)
        n -= invalid
        if result.status is ExportStatus.SUCCESS:
            rejected = min(result.rejected_spans, n)
            counters.add(exported, n - rejected)
            counters.add("batches_exported")
            counters.add("bytes_sent", result.bytes_sent)
            if rejected:
                self._drop(DropReason.PARTIAL_REJECTED, rejected)
        elif result.status is ExportStatus.PERMANENT:
            self._drop(DropReason.REJECTED, n)
            counters.add("permanent_failures")
        else:
            self._drop(DropReason.EXPORT_FAILED, n)
            counters.add("batches_failed")
            self._log.warning(
                "export_failed",
                "otlp export failed after retries; batch dropped",
                spans=n,
                detail=result.detail,
            )

    def _release_flushers(self, *, everything: bool = False) -> None:
        if not self._flush_waiters:
            return
        with self._flush_lock:
            # Idle: nothing buffered and nothing taken but unsettled (spans
            # evicted by drop_oldest are never taken, so a target may stay unreached).
            idle = everything or (not self._q and self._done >= self._taken)
            keep = []
            for target, event in self._flush_waiters:
                if idle or self._done >= target:
                    event.set()
                else:
                    keep.append((target, event))
            self._flush_waiters = keep

    # -- control ------------------------------------------------------------------

    def force_flush(self, timeout: float | None = 30.0) -> bool:
        """Export everything submitted before this call; False if ``timeout`` passed first."""
        if not self._thread.is_alive():
            return not self._q
        event = threading.Event()
        with self._flush_lock:
            self._flush_waiters.append((self._taken + len(self._q), event))
        self._wake.set()
        return event.wait(timeout)

    def shutdown(self, timeout: float = 30.0, *, close_spool: bool = True) -> ShutdownReport:
        """Refuse new spans, export what is buffered within ``timeout`` seconds (with a
        spool: spool what cannot be sent by then), stop.

        Idempotent: later calls return the first report. ``close_spool=False`` leaves
        a spool this pipeline opened open, for a caller that still needs it.
        """
        with self._flush_lock:
            if self._report is not None:
                return self._report
            already = self._closed
            self._closed = True
            self._limit = -1
        if not already:
            self._stop_at = self._timer.monotonic() + timeout
            ctx = self._ctx
            if ctx is not None:
                ctx.deadline = min(ctx.deadline, self._stop_at)
            self._wake.set()
            self._timer.wake()
            with self._room:
                self._room.notify_all()
        join_until = time.monotonic() + timeout + 1.0
        if not already:
            self._announce_flush(timeout)
        if self._encode_thread is not None:
            self._encode_thread.join(max(0.0, join_until - time.monotonic()))
        self._thread.join(max(0.0, join_until - time.monotonic()))
        completed = not self._thread.is_alive()
        try:
            self._exporter.shutdown()
        except Exception as exc:
            self._log.warning("exporter_shutdown", "exporter shutdown raised", error=repr(exc))
        self._drops.close()
        stats = self.stats()
        not_sent = (
            stats.dropped.get(DropReason.SHUTDOWN_DEADLINE, 0)
            + stats.queue_depth
            + (stats.in_flight if not completed else 0)
        )
        report = ShutdownReport(
            completed=completed and not_sent == 0,
            not_sent=not_sent,
            spooled=stats.spooled,
            stats=stats,
        )
        if completed:
            self._report = report
            if close_spool and self._owns_spool and self._spool is not None:
                self._spool.close()
        return report

    def _announce_flush(self, timeout: float) -> None:
        """Say what shutdown waits for, when it waits: if the last spans are not
        settled within ``announce_after_s`` (a backend that answers takes them in
        that time, and a program that exports from code is not told of it), how
        many, where they go and the longest it may still take."""
        started = time.monotonic()
        self._thread.join(min(self._announce_after_s, timeout))
        if not self._thread.is_alive():
            return
        waiting = len(self._q) + max(0, self._taken - self._done)
        if not waiting:
            return
        timeout = max(0.0, timeout - (time.monotonic() - started))
        where = describe_destination(self._exporter)
        with contextlib.suppress(Exception):  # a broken log pipeline must not stop shutdown
            structlog.get_logger("zerver.export").info(
                f"flushing {waiting} spans to {where}, up to {timeout:.3g}s",
                spans=waiting,
                destination=where,
                timeout_s=round(timeout, 3),
                spool=self._spool.path if self._spool is not None else None,
            )

    def abandon(self) -> int:
        """Stop at once (the process is about to exit): what is still buffered or in
        flight is counted as ``abandoned`` and returned; nothing is waited for."""
        with self._flush_lock:
            self._closed = True
            self._limit = -1
            self._stop_at = self._timer.monotonic()
        stats = self.stats()
        lost = stats.queue_depth + stats.in_flight
        if lost:
            self._counters.add(DropReason.ABANDONED, lost)
        self._timer.wake()
        return lost

    async def aflush(self, timeout: float | None = 30.0) -> bool:
        """:meth:`force_flush` without blocking the event loop."""
        return await anyio.to_thread.run_sync(self.force_flush, timeout)

    async def ashutdown(self, timeout: float = 30.0) -> ShutdownReport:
        """:meth:`shutdown` without blocking the event loop (the server's SIGTERM path)."""
        return await anyio.to_thread.run_sync(self.shutdown, timeout)

    def __enter__(self) -> ExportPipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- counters -----------------------------------------------------------------

    def stats(self) -> ExportStats:
        """A snapshot of every counter; cheap enough for a debug page or metrics scrape."""
        values = dict(self._counters.values)
        with self._submit_lock:
            submit_drops = dict(self._submit_drops)
        dropped = {reason: 0 for reason in (*DropReason.ALL, INVALID)}
        for reason, n in (*values.items(), *submit_drops.items()):
            if reason in dropped:
                dropped[reason] += n
        depth = len(self._q)
        taken = self._taken
        submitted = taken + depth + sum(submit_drops.values())
        batches = values.get("batches_exported", 0) + values.get("batches_failed", 0)
        batches += values.get("permanent_failures", 0)
        breaker = self._breaker
        return ExportStats(
            submitted=submitted,
            exported=values.get("exported", 0),
            dropped=dropped,
            queue_depth=depth,
            queue_capacity=self._capacity,
            in_flight=max(0, taken - self._done),
            batches_exported=values.get("batches_exported", 0),
            batches_failed=values.get("batches_failed", 0),
            permanent_failures=values.get("permanent_failures", 0),
            retries=values.get("retries", 0),
            partial_rejections=values.get(DropReason.PARTIAL_REJECTED, 0),
            rate_limited=values.get("rate_limited", 0),
            breaker_state=breaker.state.value if breaker is not None else "disabled",
            breaker_openings=breaker.openings if breaker is not None else 0,
            bytes_sent=values.get("bytes_sent", 0),
            spooled=values.get("spooled", 0),
            replayed=values.get("replayed", 0),
            spool=self._spool.statistics() if self._spool is not None else None,
            export_latency_last_ms=self._latency_last,
            export_latency_avg_ms=self._latency_sum / batches if batches else 0.0,
            export_latency_max_ms=self._latency_max,
        )
