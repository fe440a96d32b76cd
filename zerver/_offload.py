"""Tracing in a separate process: records are packed here, spans built and exported there.

On a machine with more than one core, building spans (~15 µs a request) and
encoding them (~5 µs a span) on the request's own core competes with request
handling under the GIL. Instead, each finished :class:`~zerver.RequestRecord`
is packed into a tuple of primitives (a few µs) and appended to a bounded
buffer; a feeder thread marshals batches down a pipe to an exporter process,
which rebuilds the records, runs the same :class:`~zerver.TraceEngine` and
export pipeline, and reports its counters back.

Rules:

* ``on_request_end`` never blocks and never raises; a full buffer drops the
  record and counts it (``records_dropped``).
* Shutdown flushes the buffer, tells the child to drain its pipeline within
  the deadline, and collects its final counters.
* The child ignores SIGINT/SIGTERM (the parent decides when it stops) and
  drains and exits by itself if the parent disappears (pipe EOF).
"""

from __future__ import annotations

import contextlib
import dataclasses
import marshal
import multiprocessing
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

import structlog

from ._config import Settings
from ._effects import Effect
from ._records import (
    JobState,
    NeedRecord,
    ParkEpisode,
    RequestRecord,
    RetryRecord,
    SlotWrite,
    StepRecord,
)

if TYPE_CHECKING:
    from ._tracing import TraceEngine
    from .export import ExportStats

_log = structlog.get_logger("zerver.export")

__all__ = ["EngineSpec", "ProcessTraceSubscriber", "pack_record", "unpack_record"]

_STOP = b"STOP"


# -- packing ---------------------------------------------------------------------------


def _pack_effect(e: Effect | None) -> tuple[Any, ...] | None:
    if e is None:
        return None
    return (
        e.system,
        e.operation,
        e.required,
        e.timeout_ms,
        e.target,
        getattr(e, "table", None),
        getattr(e, "key", None),
        getattr(e, "namespace", None),
        getattr(e, "url", None),
        getattr(e, "topic", None),
    )


def _pack_job(j: JobState) -> tuple[Any, ...]:
    return (
        j.index, j.kind, j.name, j.queue, j.step_index, _pack_effect(j.effect),
        j.cont_step_index, j.span_id, j.enqueue_ts, j.take_ts, j.start_ts, j.end_ts,
        [(p.cause, p.park_ts, p.token, p.limit_current, p.limit_max, p.resume_ts)
         for p in j.park_episodes] if j.park_episodes else None,
        j.worker, j.attempts, j.success, j.outcome, j.error_type, j.error_message,
        j.status_hint, j.depth_enqueue, j.depth_take,
        [(r.ts, r.attempt, r.reason, r.backoff_ms) for r in j.retries] if j.retries else None,
        j.result_meta,
    )  # fmt: skip


def _pack_step(s: StepRecord) -> tuple[Any, ...]:
    n = s.need
    need = None if n is None else (
        n.requested_ts, n.n_effects, n.mode, n.join, n.then, n.jobs, n.join_ts,
        n.completed, n.failed,
    )  # fmt: skip
    return (
        s.index, s.span_id, s.name, s.layer, s.sequence, s.reads, s.writes, s.start_ts,
        s.end_ts, s.decision, s.resume, need, s.job_index, s.error_type, s.error_message,
        s.render_phase, s.render_size,
    )  # fmt: skip


def pack_record(r: RequestRecord) -> tuple[Any, ...]:
    """A finished record as nested tuples of primitives (``marshal``-able)."""
    return (
        r.start_ts, r.start_wall_ns, r.end_ts, r.method, r.route, r.path, r.query, r.params,
        r.scheme, r.host, r.user_agent, r.server_address, r.server_port, r.client_address,
        r.client_port, r.protocol_version, r.request_body_size, r.response_body_size,
        r.status, r.request_id, r.traceparent, r.tracestate, r.baggage, r.trace_id,
        r.span_id, r.parent_span_id, r.parent_remote, r.trace_flags, r.system_fault,
        r.error_type, r.error_message, r.error_id, r.kind, r.message_id, r.message_size,
        r.message_attempt, r.links,
        [_pack_step(s) for s in r.steps],
        [_pack_job(j) for j in r.jobs],
        [(w.ts, w.slot, w.size_bytes, w.step_index, w.job_index) for w in r.slot_writes],
    )  # fmt: skip


class _EffectView:
    """What the trace engine reads of an effect, rebuilt in the exporter process."""

    __slots__ = ("key", "namespace", "operation", "required", "system", "table", "target",
                 "timeout_ms", "topic", "url")  # fmt: skip

    def __init__(self, t: tuple[Any, ...]) -> None:
        (self.system, self.operation, self.required, self.timeout_ms, self.target, table,
         key, namespace, url, topic) = t  # fmt: skip
        # Only the attributes the effect really had exist, as on the real effect.
        for name, value in (("table", table), ("key", key), ("namespace", namespace),
                            ("url", url), ("topic", topic)):  # fmt: skip
            if value is not None:
                setattr(self, name, value)

    @property
    def span_name(self) -> str:
        return f"{self.system}.{self.operation} {self.target}" if self.target else (
            f"{self.system}.{self.operation}")  # fmt: skip


class _NoClock:
    """Records rebuilt from packed data never read the clock."""

    def now_ns(self) -> int:
        return 0

    def wall_ns(self) -> int:
        return 0

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - never called
        raise RuntimeError("unpacked records have no clock")


_NO_CLOCK = _NoClock()


def unpack_record(t: tuple[Any, ...], ids: random.Random | None = None) -> RequestRecord:
    """The inverse of :func:`pack_record` (a record fit for ``TraceEngine.build``)."""
    r = RequestRecord(_NO_CLOCK, ids)
    (r.start_ts, r.start_wall_ns, r.end_ts, r.method, r.route, r.path, r.query, r.params,
     r.scheme, r.host, r.user_agent, r.server_address, r.server_port, r.client_address,
     r.client_port, r.protocol_version, r.request_body_size, r.response_body_size,
     r.status, r.request_id, r.traceparent, r.tracestate, r.baggage, r.trace_id,
     r.span_id, r.parent_span_id, r.parent_remote, r.trace_flags, r.system_fault,
     r.error_type, r.error_message, r.error_id, r.kind, r.message_id, r.message_size,
     r.message_attempt, links, steps, jobs, writes) = t  # fmt: skip
    r.links = [tuple(x) for x in links]
    for s in steps:
        sr = StepRecord(index=s[0], name=s[2], layer=s[3], sequence=s[4], reads=s[5],
                        writes=s[6], start_ts=s[7], job_index=s[12])  # fmt: skip
        sr.span_id = s[1]
        sr.end_ts, sr.decision, sr.resume = s[8], s[9], s[10]
        sr.error_type, sr.error_message, sr.render_phase, sr.render_size = s[13:17]
        if s[11] is not None:
            n = s[11]
            need = NeedRecord(n[0], n[1], n[2], n[3], n[4])
            need.jobs, need.join_ts, need.completed, need.failed = list(n[5]), n[6], n[7], n[8]
            sr.need = need
        r.steps.append(sr)
    for j in jobs:
        effect = cast(Effect, _EffectView(j[5])) if j[5] is not None else None
        st = JobState(index=j[0], kind=j[1], name=j[2], queue=j[3], step_index=j[4],
                      effect=effect)  # fmt: skip
        (st.cont_step_index, st.span_id, st.enqueue_ts, st.take_ts, st.start_ts,
         st.end_ts) = j[6:12]  # fmt: skip
        if j[12]:
            for cause, park_ts, token, cur, mx, resume in j[12]:
                ep = ParkEpisode(cause, park_ts, token, cur, mx)
                ep.resume_ts = resume
                st.park_episodes.append(ep)
        (st.worker, st.attempts, st.success, st.outcome, st.error_type, st.error_message,
         st.status_hint, st.depth_enqueue, st.depth_take) = j[13:22]  # fmt: skip
        if j[22]:
            st.retries = [RetryRecord(*x) for x in j[22]]
        st.result_meta = j[23]
        r.jobs.append(st)
    r.slot_writes = [SlotWrite(*w) for w in writes]
    return r


# -- the exporter process --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """Everything the child needs to build the same spans as an in-process engine.

    ``settings`` are the app's (promotion, semantic conventions, logging, the drain
    deadline); ``resource`` and ``static_attributes`` what the app computed from them.
    """

    settings: Settings
    resource: dict[str, Any]
    static_attributes: dict[str, dict[str, Any]]
    environ: dict[str, str]
    parent_cpus: list[int] = dataclasses.field(default_factory=list)

    @property
    def drain_timeout_s(self) -> float:
        return self.settings.shutdown_timeout_s


def _child_main(conn: Connection, spec: EngineSpec) -> None:
    """Entry point of the exporter process (spawned, so ``spec`` arrives pickled)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ._spans import Resource
    from ._telemetry import PipelineSink
    from ._tracing import engine_from_settings
    from .export import ExportConfig, ExportPipeline, Overflow

    _use_other_cores(spec.parent_cpus)
    from ._logging import configure_logging

    configure_logging(spec.settings.log_format, spec.settings.log_level)
    # Here a full export queue blocks intake instead of dropping: the pipe, and then
    # the request process's bounded buffer (which drops and counts), absorb it.
    config = dataclasses.replace(
        ExportConfig.from_env(spec.environ), overflow=Overflow.BLOCK, block_timeout_s=60.0
    )
    pipeline = ExportPipeline.from_config(config)
    sink = PipelineSink(pipeline, drain_timeout_s=spec.drain_timeout_s)
    engine = engine_from_settings(
        spec.settings,
        sink,
        resource=Resource(attributes=spec.resource),
        interpreters={k: _Static(v) for k, v in spec.static_attributes.items()},
    )
    ids = random.Random()
    last_report = time.monotonic()
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break  # the parent is gone: drain and exit
            if data == _STOP:
                break
            for blob in marshal.loads(data):
                try:
                    engine.on_request_end(unpack_record(marshal.loads(blob), ids))
                except Exception:
                    engine.errors += 1
            now = time.monotonic()
            if now - last_report > 0.5:
                last_report = now
                _send_stats(conn, engine, pipeline.stats())
    finally:
        report = pipeline.shutdown(spec.drain_timeout_s)
        _send_stats(conn, engine, pipeline.stats(), final=True, not_sent=report.not_sent)
        conn.close()


def _use_other_cores(parent_cpus: list[int]) -> None:
    """Prefer the cores the request process is not pinned to.

    The point of this process is to take span building and encoding off the
    request-handling core: with the server pinned to some cores, run on the
    others; otherwise anywhere.
    """
    with contextlib.suppress(AttributeError, OSError):
        every = set(range(os.cpu_count() or 1))
        others = every - set(parent_cpus)
        os.sched_setaffinity(0, others or every)


class _Static:
    __slots__ = ("span_attributes",)

    def __init__(self, attrs: Mapping[str, Any]) -> None:
        self.span_attributes = attrs


def _send_stats(
    conn: Connection,
    engine: TraceEngine,
    stats: ExportStats,
    *,
    final: bool = False,
    not_sent: int = 0,
) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(
            {"final": final, "built": engine.built, "errors": engine.errors,
             "unsampled": engine.unsampled, "not_sent": not_sent, "export": asdict(stats)}
        )  # fmt: skip


# -- the request process's side --------------------------------------------------------


class ProcessTraceSubscriber:
    """A :class:`~zerver.Subscriber` that builds and exports traces in another process.

    ``stats()`` gives this side's counters and the latest counters the
    exporter process reported (its :class:`~zerver.export.ExportStats` as a dict).
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        max_pending: int = 16_384,
        batch: int = 128,
        flush_interval_s: float = 0.05,
    ) -> None:
        self.spec = spec
        self.max_pending = max_pending
        self.batch = batch
        self.flush_interval_s = flush_interval_s
        self.records_submitted = 0
        self.records_dropped = 0
        self.records_sent = 0
        self.unsampled = 0
        self.child_stats: dict[str, Any] = {}
        # deque.append and popleft are atomic under the GIL: no lock on the request path.
        self._pending: deque[bytes] = deque()
        self._wake = threading.Event()
        self._closed = False
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=_child_main, args=(child_conn, spec), name="zerver-exporter",
            daemon=True,
        )  # fmt: skip
        self._process.start()
        child_conn.close()
        self._thread = threading.Thread(target=self._feed, name="zerver-trace-feeder",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def on_request_end(self, record: RequestRecord) -> None:
        if not record.trace_flags & 0x01:
            self.unsampled += 1
            return
        pending = self._pending
        if len(pending) >= self.max_pending or self._closed:
            self.records_dropped += 1
            return
        # Marshalled at once: a backlog of bytes objects is invisible to the garbage
        # collector, while one of nested tuples made its full collections slow.
        pending.append(marshal.dumps(pack_record(record)))
        self.records_submitted += 1
        if len(pending) >= self.batch:
            self._wake.set()

    def _feed(self) -> None:
        conn = self._conn
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            pending = self._pending
            batch = [pending.popleft() for _ in range(len(pending))]
            if batch:
                try:
                    conn.send_bytes(marshal.dumps(batch))
                    self.records_sent += len(batch)
                except (OSError, ValueError):
                    self.records_dropped += len(batch)
            self._read_stats()
            if self._closed and not self._pending:
                return

    def _read_stats(self, timeout: float = 0.0) -> bool:
        final = False
        try:
            while self._conn.poll(timeout):
                msg = self._conn.recv()
                self.child_stats = msg
                final = final or bool(msg.get("final"))
                if final:
                    break
                timeout = 0.0
        except (EOFError, OSError):
            return True
        return final

    def stats(self) -> dict[str, Any]:
        """Counters of both sides (the child's as last reported)."""
        return {
            "records_submitted": self.records_submitted,
            "records_sent": self.records_sent,
            "records_dropped": self.records_dropped,
            "unsampled": self.unsampled,
            "exporter": self.child_stats,
        }

    def shutdown(self) -> None:
        """Flush, let the exporter process drain within its deadline, collect its counters."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=self.spec.drain_timeout_s)
        with contextlib.suppress(OSError, ValueError):
            self._conn.send_bytes(_STOP)
        deadline = time.monotonic() + self.spec.drain_timeout_s + 5.0
        while time.monotonic() < deadline:
            if self._read_stats(timeout=0.2):
                break
            if not self._process.is_alive():
                self._read_stats()
                break
        self._process.join(timeout=max(deadline - time.monotonic(), 0.1))
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._conn.close()
        self._process.close()
        stats = self.stats()
        export = self.child_stats.get("export", {})
        lost = (
            self.records_dropped
            + int(self.child_stats.get("not_sent", 0))
            + sum(dict(export.get("dropped", {})).values())
        )
        (_log.warning if lost else _log.info)(
            "trace export stopped",
            records=stats["records_submitted"],
            records_dropped=self.records_dropped,
            spans_exported=export.get("exported", 0),
            spans_dropped=dict(export.get("dropped", {})),
            not_sent=self.child_stats.get("not_sent", 0),
        )
