"""Tracing in a separate process: records are packed here, spans built and exported there.

On a machine with more than one core, building spans (~15 µs a request) and
encoding them (~5 µs a span) on the request's own core competes with request
handling under the GIL. Instead, each finished :class:`~zerver.trace.RequestRecord`
is packed into a tuple of primitives (a few µs) and appended to a bounded
buffer; a feeder thread sends batches of them down a pipe to an exporter
process, which rebuilds the records, runs the same :class:`~zerver.trace.TraceEngine`
and export pipeline, and reports its counters back.

Rules of the hand-over. The *server* is the request-handling process, the
*exporter* its child; each rule is kept by the one thread it names.

Server side:

* ``on_request_end`` (the request path) never blocks, never raises and takes
  no lock: it appends the marshalled record to a bounded buffer. When the
  buffer is full the record is dropped, counted (``records_dropped``) and
  logged by the drop reporter's thread within a second.
* The *feeder* thread is the only writer to the pipe, so no two messages can
  interleave. It sends numbered batches while fewer than ``window`` are
  unacknowledged and keeps each batch until the exporter acknowledges it.
  While the exporter cannot take more (starting, restarting, behind), the
  buffer absorbs records; past half the buffer the feeder writes batches to
  the spool itself (``records_spooled``).
* The feeder notices the exporter's death at once (the pipe closes, the
  process sentinel fires), logs its exit code or signal, starts a new one with
  back-off and sends it every unacknowledged batch again: at least once, so a
  trace may arrive twice but none is lost. After ``max_restarts`` exporters in
  a row died before running for ``_STABLE_S``, spans are built in this process
  instead (the in-process pipeline), and the log says so.
* Shutdown: the feeder hands over what is buffered, sends STOP with the time
  left, and spools whatever the exporter has not acknowledged when it exits or
  the deadline passes (then it is killed). :meth:`~ProcessTraceSubscriber.abandon`
  (a second signal) spools what this process holds and kills the exporter.

Exporter side:

* SIGINT and SIGTERM are blocked while it is spawned and ignored before they
  are unblocked, so a Ctrl-C at any moment never prints its traceback: the
  server decides when it stops.
* A reader thread takes batches off the pipe into a small intake. When the
  intake is full, or the spool already holds records (their order is kept),
  the batch goes to the spool and is acknowledged at once.
* The main thread builds spans from the intake, oldest first (memory, then the
  spool's records), into the export pipeline, waiting for room rather than
  having spans refused, and acknowledges a batch once all its spans have
  settled there (exported, spooled, or dropped and counted).
* On STOP it builds what it holds within the time left, or, with the backend
  down, spools it unbuilt; shuts the pipeline down (which sends or spools the
  rest); acknowledges everything; sends its final counters and exits. On pipe
  EOF (the server is gone) it does the same within the drain deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import marshal
import multiprocessing
import os
import random
import signal
import struct
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import structlog

from zerver._config import Settings
from zerver._gc import EXPORTER_THRESHOLDS, tune_gc
from zerver.core._effects import SPAN_FACTS, Effect, effect_span_attributes
from zerver.core._errors import ConfigError
from zerver.export._config import ExportConfig, MetricsExportConfig
from zerver.export._log import DropReporter

from ._cpu_share import IDLE, NORMAL, CpuShare, Priority, set_priority, spare_cpu_unavailable
from ._records import RECORD_CLASSES, Record, RequestRecord

if TYPE_CHECKING:
    from zerver.export import ExportPipeline
    from zerver.export._spool import Spool, SpoolItem

    from ._metrics_worker import MetricsWorker
    from ._tracing import TraceEngine

_log = structlog.get_logger("zerver.export")

__all__ = [
    "PACK_SCHEMA",
    "EngineSpec",
    "ProcessTraceSubscriber",
    "codec_source",
    "pack_record",
    "records_item_spans",
    "unpack_record",
]

PACK_SCHEMA = "3"
"""Version of :func:`pack_record`'s layout, stored with spooled records; bump it
whenever the layout changes, so an older spool is reported rather than misread."""

# Messages. Server → exporter: a batch (seq and record blobs) or STOP (seconds left),
# framed by hand (``_frame_batch`` / ``_frame_stop``, read by ``_unframe``) so a
# batch is built once at its exact size: marshalling the tuple grows a buffer by
# doubling, and at a few thousand batches a second those growing buffers left
# the feeder thread's malloc arena holding more and more memory (RSS growing
# about 1 MB per 50 000 requests, none of it in use). Exporter → server, few and
# small, marshalled tuples: (_READY,), (_ACK, [seqs], counters or None) and
# (_FINAL, [seqs], counters). With metrics on, the server also sends the requests
# it has in flight when that changed (``_frame_active``, at most once per wake of
# the feeder): finished records cannot tell.
_BATCH, _STOP, _READY, _ACK, _FINAL, _ACTIVE = "b", "s", "r", "a", "f", "i"
_SEQ = struct.Struct("<Q")
_LEN = struct.Struct("<I")
_SECONDS = struct.Struct("<d")


def _frame_batch(seq: int, blobs: list[bytes]) -> bytes:
    parts: list[bytes] = [b"b", _SEQ.pack(seq)]
    pack = _LEN.pack
    for blob in blobs:
        parts.append(pack(len(blob)))
        parts.append(blob)
    return b"".join(parts)


def _frame_stop(seconds: float) -> bytes:
    return b"s" + _SECONDS.pack(seconds)


def _frame_active(active: Mapping[tuple[str, str], int]) -> bytes:
    return b"i" + marshal.dumps([(m, s, n) for (m, s), n in active.items()])


def _unframe(data: bytes) -> tuple[str, Any, Any]:
    """A server message back into (kind, ...): (_BATCH, seq, blobs), (_STOP, seconds,
    None) or (_ACTIVE, {(method, scheme): in flight}, None)."""
    kind = data[:1]
    if kind == b"s":
        return _STOP, _SECONDS.unpack_from(data, 1)[0], None
    if kind == b"i":
        return _ACTIVE, {(m, s): n for m, s, n in marshal.loads(data[1:])}, None
    if kind != b"b":
        raise ValueError(f"unknown message {kind!r}")
    (seq,) = _SEQ.unpack_from(data, 1)
    view = memoryview(data)
    blobs: list[bytes] = []
    at, end, size = 1 + _SEQ.size, len(data), _LEN.size
    unpack = _LEN.unpack_from
    while at < end:
        (n,) = unpack(data, at)
        at += size
        if at + n > end:
            raise ValueError("truncated batch")
        blobs.append(bytes(view[at : at + n]))
        at += n
    return _BATCH, seq, blobs


_STABLE_S = 10.0
"""An exporter that ran this long is healthy: the restart back-off starts over."""
_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_ROOM_PER_RECORD = 64
"""Buffer room the builder waits for before building one record (a request
rarely makes more spans; one that does waits in the pipeline's own block)."""


# -- packing ---------------------------------------------------------------------------


# Packing and unpacking are generated from the records' declared schemas
# (``SCHEMA`` in ``zerver.trace._records``) once, at import: one function per record
# class, a tuple display over the fields in order, which is what a hand-written
# packer would be and costs the same on the request path (a loop of getattr calls
# or an ``operator.attrgetter`` measured slower). ``codec_source()`` shows the code.

_new = object.__new__


def _is_record(t: Any) -> bool:
    return isinstance(t, type) and hasattr(t, "SCHEMA")


def _shape(t: Any) -> tuple[str, Any]:
    """How a field of type ``t`` is packed: ("value" | "effect" | "record" |
    "optional" | "list", the record class or None)."""
    if _is_record(t):
        return "record", t
    if isinstance(t, types.UnionType):
        args = [a for a in t.__args__ if a is not type(None)]
        if len(args) == 1 and args[0] is Effect:
            return "effect", None
        if len(args) == 1 and _is_record(args[0]):
            return "optional", args[0]
    if isinstance(t, types.GenericAlias) and t.__origin__ is list and _is_record(t.__args__[0]):
        return "list", t.__args__[0]
    return "value", None


def _pack_expr(cls: type[Record], o: str, depth: int) -> str:
    """A tuple display packing the record ``o`` of class ``cls``.

    Lists of records are packed inline, as comprehensions (a call per element
    cost about a tenth of the packing); a record that may be None by its function.
    """
    items: list[str] = []
    for field, t in cls.SCHEMA:
        how, sub = _shape(t)
        ref = f"{o}.{field}"
        if how == "value":
            items.append(ref)
        elif how == "effect":
            items.append(f"_p_effect({ref}, {o}.result_meta)")
        elif how == "record":
            items.append(f"_p_{sub.__name__}({ref})")
        elif how == "optional":
            items.append(f"(None if {ref} is None else _p_{sub.__name__}({ref}))")
        else:
            x = f"x{depth}"
            inner = _pack_expr(sub, x, depth + 1)
            items.append(f"([{inner} for {x} in {ref}] if {ref} else None)")
    return "(" + ", ".join(items) + ",)"


def _codec_source() -> str:
    """The source of the packers (``_p_<Class>``) and unpackers (``_u_<Class>``)."""
    facts = ", ".join(f"cls.{name}" for name in SPAN_FACTS)
    lines = [
        "def _p_effect(e, result):",
        "    if e is None:",
        "        return None",
        "    cls = type(e)",
        "    facts = _class_facts.get(cls)",
        "    if facts is None:",
        f"        facts = _class_facts[cls] = ({facts})",
        "    try:",
        "        attrs = e.span_attributes(result)",
        "    except Exception:",
        "        attrs = effect_span_attributes(e, result)  # says what it raised",
        "    return (facts, e.required, e.timeout_ms, attrs)",
        "",
    ]
    for cls in RECORD_CLASSES:
        name = cls.__name__
        targets: list[str] = []
        after: list[str] = []
        for i, (field, t) in enumerate(cls.SCHEMA):
            how, sub = _shape(t)
            if how == "value":
                targets.append(f"o.{field}")
                continue
            v = f"v{i}"
            targets.append(v)
            if how == "effect":
                after.append(f"o.{field} = None if {v} is None else _EffectView({v})")
            elif how == "record":
                after.append(f"o.{field} = _u_{sub.__name__}({v})")
            elif how == "optional":
                after.append(f"o.{field} = None if {v} is None else _u_{sub.__name__}({v})")
            else:
                after.append(f"o.{field} = [_u_{sub.__name__}(x) for x in {v}] if {v} else []")
        lines += [f"def _p_{name}(o):", f"    return {_pack_expr(cls, 'o', 0)}", ""]
        lines += [f"def _u_{name}(t):", f"    o = _new({name})"]
        lines.append(f"    ({', '.join(targets)},) = t")
        lines += [f"    {line}" for line in after]
        lines += ["    return o", ""]
    return "\n".join(lines)


def codec_source() -> str:
    """The generated packing code, for reading (it is what runs)."""
    return _codec_source()


class _EffectView:
    """What the trace engine reads of an effect, rebuilt in the exporter process:
    :data:`~zerver.core._effects.SPAN_FACTS` and the attributes the effect gave its span."""

    __slots__ = (*SPAN_FACTS, "attributes", "required", "timeout_ms")
    system: str
    operation: str
    required: bool
    timeout_ms: int
    effect_kind: str
    span_kind: str
    attributes: dict[str, Any]

    def __init__(self, packed: tuple[Any, ...]) -> None:
        facts, self.required, self.timeout_ms, self.attributes = packed
        for name, value in zip(SPAN_FACTS, facts, strict=True):
            setattr(self, name, value)

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, Any]:
        """What the effect said of its span when the record was packed."""
        return self.attributes


def _compile_codec() -> dict[str, Any]:
    scope: dict[str, Any] = {
        "_new": _new,
        "_EffectView": _EffectView,
        "_class_facts": {},
        "effect_span_attributes": effect_span_attributes,
    }
    scope.update((cls.__name__, cls) for cls in RECORD_CLASSES)
    exec(compile(_codec_source(), "<zerver record codec>", "exec"), scope)
    return scope


_CODEC = _compile_codec()
_pack_request: Callable[[RequestRecord], tuple[Any, ...]] = _CODEC["_p_RequestRecord"]
_unpack_request: Callable[[tuple[Any, ...]], RequestRecord] = _CODEC["_u_RequestRecord"]


def pack_record(r: RequestRecord) -> tuple[Any, ...]:
    """A finished record as nested tuples of primitives (``marshal``-able), laid out
    as the record classes' ``SCHEMA`` say; effects as what their spans need."""
    return _pack_request(r)


class _NoClock:
    """Records rebuilt from packed data never read the clock."""

    def now_ns(self) -> int:
        return 0

    def wall_ns(self) -> int:
        return 0

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - never called
        raise RuntimeError("unpacked records have no clock")


_NO_CLOCK = _NoClock()
_default_ids = random.Random()


def unpack_record(t: tuple[Any, ...], ids: random.Random | None = None) -> RequestRecord:
    """The inverse of :func:`pack_record` (a record fit for ``TraceEngine.build``)."""
    r = _unpack_request(t)
    r.clock = _NO_CLOCK
    r.ids = ids if ids is not None else _default_ids
    r.otel_context = False
    r.current_step = None
    r.current_job = None
    return r


def handover_bytes(record: RequestRecord) -> bytes:
    """What the request path hands the exporter process for one finished record.

    Marshalled at once: a backlog of bytes objects is invisible to the garbage
    collector, while one of nested tuples made its full collections slow.
    """
    return marshal.dumps(pack_record(record))


def records_item_spans(engine: TraceEngine, item: SpoolItem) -> list[Any]:
    """The spans of a spooled batch of records (for a pipeline's ``rebuild``).

    Raises ``ValueError`` for records packed in another layout (:data:`PACK_SCHEMA`).
    """
    if item.meta.get("schema") != PACK_SCHEMA:
        raise ValueError(f"records packed with schema {item.meta.get('schema')!r}")
    ids = random.Random()
    spans: list[Any] = []
    for blob in marshal.loads(item.body):
        kept = engine.decide_and_build(unpack_record(marshal.loads(blob), ids))
        if kept is not None:
            spans.extend(kept)
    return spans


# -- building, in the exporter process or as the server's fallback ---------------------------


class _CountingSink:
    """Hands spans to the pipeline and counts them: the count is each batch's
    position in the pipeline's settle order."""

    __slots__ = ("count", "pipeline")

    def __init__(self, pipeline: ExportPipeline) -> None:
        self.pipeline = pipeline
        self.count = 0

    def export(self, spans: list[Any]) -> None:
        submit = self.pipeline.submit
        for span in spans:
            submit(span)
        self.count += len(spans)


class _Builder:
    """Builds batches of packed records into a pipeline and tells when each batch
    has settled there. Used by one thread."""

    def __init__(
        self, engine: TraceEngine, sink: _CountingSink, metrics: MetricsWorker | None = None
    ) -> None:
        self.engine = engine
        self.sink = sink
        self.pipeline = sink.pipeline
        self.metrics = metrics
        """Given every record after its sampling decision, when metrics are exported."""
        self.waiting_hook: Callable[[], None] = _nothing
        """Run while waiting for room: what settled meanwhile is acknowledged then,
        not only once the batch being built is done."""
        self._ids = random.Random()
        # (spans submitted once the batch was built, what to do when they settled)
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()

    def build(
        self, blobs: list[bytes], until: float, on_settled: Callable[[], None]
    ) -> list[bytes]:
        """Build ``blobs`` until the monotonic time ``until``; returns those not built
        (the caller spools them). ``on_settled`` runs once the built ones settled."""
        engine = self.engine
        offer = self.metrics.offer if self.metrics is not None else None
        for i, blob in enumerate(blobs):
            while not self.pipeline.wait_for_room(_ROOM_PER_RECORD, 0.1):
                self.settle()
                self.waiting_hook()
                if time.monotonic() >= until:
                    self._waiting.append((self.sink.count, on_settled))
                    return blobs[i:]
            try:
                record = unpack_record(marshal.loads(blob), self._ids)
                engine.on_request_end(record)
            except Exception:
                engine.errors += 1
                continue
            if offer is not None:
                offer(record)
        self._waiting.append((self.sink.count, on_settled))
        return []

    def close_metrics(self, timeout_s: float) -> None:
        """Export the last metrics and stop their worker (when there is one)."""
        if self.metrics is not None:
            self.metrics.close(timeout_s)

    def settle(self) -> None:
        """Run the callbacks of every batch whose spans have all settled."""
        done = self.pipeline.settled
        waiting = self._waiting
        while waiting and waiting[0][0] <= done:
            waiting.popleft()[1]()

    @property
    def unsettled(self) -> int:
        return len(self._waiting)


def _records_meta() -> dict[str, str]:
    return {"schema": PACK_SCHEMA}


def _nothing() -> None:
    return None


# -- the exporter process ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """Everything the exporter process needs to build and export the same spans as
    an in-process engine.

    ``settings`` are the app's (promotion, semantic conventions, logging, the drain
    deadline); ``export`` the resolved exporter configuration (endpoint, spool...);
    ``resource`` and ``static_attributes`` what the app computed from them;
    ``metrics`` the metrics export, when the server exports metrics.
    """

    settings: Settings
    export: ExportConfig
    resource: dict[str, Any]
    static_attributes: dict[str, dict[str, Any]]
    parent_cpus: list[int] = dataclasses.field(default_factory=list)
    metrics: MetricsExportConfig | None = None

    @property
    def drain_timeout_s(self) -> float:
        return self.settings.shutdown_timeout_s


def _child_main(conn: Connection, spec: EngineSpec) -> None:
    """Entry point of the exporter process (spawned, so ``spec`` arrives pickled)."""
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Blocked by the server while it spawned us: pending ones are now discarded.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    _use_other_cores(spec.parent_cpus)
    from ._logging import configure_logging

    configure_logging(spec.settings.log_format, spec.settings.log_level)
    tune_gc(*EXPORTER_THRESHOLDS)
    try:
        _Exporter(
            conn,
            _build_pipeline(spec, child=True),
            spec.drain_timeout_s,
            spec.settings.export_priority,
        ).run()
    except Exception:
        # A bug: said in the log's format; the server notices the exit and restarts us.
        _log.exception("exporter process failed")
        raise SystemExit(1) from None


def _build_pipeline(spec: EngineSpec, *, child: bool) -> _Builder:
    """The export pipeline and the builder feeding it, as ``spec`` describes."""
    from zerver.export import ExportPipeline, Overflow
    from zerver.export._sinks import InMemorySpanSink
    from zerver.export._spans import Resource

    from ._tracing import engine_from_settings

    def engine(sink: Any) -> TraceEngine:
        return engine_from_settings(
            spec.settings,
            sink,
            resource=Resource(attributes=spec.resource),
            interpreters={k: _Static(v) for k, v in spec.static_attributes.items()},
        )

    # The builder waits for room, so the pipeline never refuses a span it is given.
    config = dataclasses.replace(spec.export, overflow=Overflow.BLOCK, block_timeout_s=60.0)
    # In the exporter process the builder replays spooled records itself, in order
    # with what arrives; the fallback pipeline replays them on its sender thread,
    # with an engine of its own (engines are used by one thread).
    rebuild = None
    if not child:
        replayer = engine(InMemorySpanSink())
        rebuild = lambda item: records_item_spans(replayer, item)  # noqa: E731
    try:
        pipeline = ExportPipeline.from_config(config, rebuild=rebuild)
    except ConfigError as exc:  # the spool went away since start-up: carry on without
        _log.error("trace spool unavailable; exporting without one", error=str(exc))
        config = dataclasses.replace(config, spool_dir=None)
        pipeline = ExportPipeline.from_config(config, rebuild=rebuild)
    sink = _CountingSink(pipeline)
    metrics = None
    if spec.metrics is not None:
        from ._metrics_worker import MetricsWorker

        metrics = MetricsWorker.from_config(
            spec.metrics,
            spec.resource,
            semconv_mode=spec.settings.semconv_mode,
            export=spec.export,
            pipeline_stats=pipeline.stats,
        )
    return _Builder(engine(sink), sink, metrics)


class _Static:
    __slots__ = ("span_attributes",)

    def __init__(self, attrs: Mapping[str, Any]) -> None:
        self.span_attributes = attrs


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


class _Intake:
    """The exporter's in-memory intake, spilling to the spool (rules in the module
    docstring). The reader thread offers, the main thread takes."""

    def __init__(self, spool: Spool | None, capacity: int = 4) -> None:
        self._spool = spool
        self._capacity = capacity
        self._mem: deque[tuple[int, list[bytes]]] = deque()
        self._cond = threading.Condition(threading.Lock())
        # Records already wait in the spool (an earlier run's, or another process's):
        # new batches queue behind them.
        self._spilling = spool is not None and spool.pending(("records",)) > 0
        self._next_look = 0.0
        self.stopped = False
        self.stop_at = 0.0
        self.spilled = 0
        self.lost = 0

    def offer(self, seq: int, blobs: list[bytes], ack: Callable[[list[int]], None]) -> None:
        with self._cond:
            if self._spool is None:
                # Nowhere to spill: stop reading, so the server's buffer takes the strain.
                while len(self._mem) >= self._capacity and not self.stopped:
                    self._cond.wait(0.1)
            elif self._spilling or len(self._mem) >= self._capacity:
                self._spilling = True
                if self._spool.put("records", marshal.dumps(blobs), len(blobs), _records_meta()):
                    self.spilled += len(blobs)
                else:
                    self.lost += len(blobs)  # the spool counted and logged it
                ack([seq])
                return
            self._mem.append((seq, blobs))
            self._cond.notify_all()

    @property
    def backlog(self) -> float:
        """How close the records waiting here are to being lost, from 0 to 1. With a
        spool, how full it is while batches go there (a full memory only means the
        next batch goes there); without one, how full memory is."""
        spool = self._spool
        if spool is not None:
            return spool.fill if self._spilling else 0.0
        return min(1.0, len(self._mem) / self._capacity)

    def stop(self, seconds: float) -> None:
        with self._cond:
            if not self.stopped:
                self.stopped = True
                self.stop_at = time.monotonic() + seconds
            self._cond.notify_all()

    def take(
        self, timeout: float, *, claim: bool = True
    ) -> tuple[int, list[bytes]] | SpoolItem | None:
        """The oldest batch: ``(seq, blobs)`` from memory, or (``claim``) records
        claimed from the spool; None if there is neither within ``timeout``."""
        with self._cond:
            if not self._mem and not self._spilling and not self.stopped:
                self._cond.wait(timeout)
            if self._mem:
                batch = self._mem.popleft()
                self._cond.notify_all()
                return batch
            spool = self._spool
            if spool is None or not claim:
                return None
            now = time.monotonic()
            if not (self._spilling or self.stopped) and now < self._next_look:
                return None  # other processes' records: looked for once a second
            self._next_look = now + 1.0
            item = spool.claim(("records",))
            if item is None:
                # Nothing we can take (puts happen under this lock, so none is missed):
                # new batches may use memory again.
                self._spilling = False
            return item

    def drain_memory(self) -> list[tuple[int, list[bytes]]]:
        with self._cond:
            batches = list(self._mem)
            self._mem.clear()
            self._cond.notify_all()
            return batches

    @property
    def empty(self) -> bool:
        return not self._mem


class _Exporter:
    """The exporter process's main loop (rules in the module docstring)."""

    def __init__(
        self, conn: Connection, builder: _Builder, drain_timeout_s: float, priority: Priority
    ) -> None:
        self.conn = conn
        self.builder = builder
        self.pipeline = builder.pipeline
        self.spool = self.pipeline.spool
        self.intake = _Intake(self.spool)
        self.drain_timeout_s = drain_timeout_s
        builder.waiting_hook = self._flush_acks
        self._send_lock = threading.Lock()
        self._acks: list[int] = []
        self._acks_lock = threading.Lock()
        self._last_report = 0.0
        # Spare CPU first, a fair share when behind (see zerver.trace._cpu_share), where
        # this process can come back to normal priority; None: normal priority
        # throughout. Changed by the reader thread (and once by run).
        self._share = self._cpu_share(priority)
        self._share_lock = threading.Lock()
        self._reader_tid: int | None = None

    @staticmethod
    def _cpu_share(priority: Priority) -> CpuShare | None:
        if priority != IDLE:
            return None
        why = spare_cpu_unavailable()
        if why is not None:
            _log.info("exporter process runs at normal priority", reason=why)
            return None
        return CpuShare()

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self.conn.send_bytes(marshal.dumps(msg))

    def ack_now(self, seqs: list[int]) -> None:
        self.send((_ACK, seqs, None))

    def _ack_later(self, seq: int) -> Callable[[], None]:
        def settled() -> None:
            with self._acks_lock:
                self._acks.append(seq)

        return settled

    def _spool_ack(self, item: SpoolItem) -> Callable[[], None]:
        spool = self.spool
        assert spool is not None
        return lambda: spool.ack(item)

    def counters(self) -> dict[str, Any]:
        engine = self.builder.engine
        out = {
            "built": engine.built,
            "errors": engine.errors,
            "unsampled": engine.unsampled,
            "records_spilled": self.intake.spilled,
            "records_lost": self.intake.lost,
            "export": asdict(self.pipeline.stats()),
            "cpu": self._cpu_counters(),
        }
        if self.builder.metrics is not None:
            out["metrics"] = self.builder.metrics.counts()
        return out

    def _cpu_counters(self) -> dict[str, Any]:
        share = self._share
        if share is None:
            return {"priority": NORMAL, "spare_first": False, "raised": 0}
        return {"priority": share.mode, "spare_first": True, "raised": share.raised}

    def _set_priority(self, change: Callable[[CpuShare], Priority | None]) -> None:
        """Apply ``change`` to the CPU share and, if it says so, to every thread but
        the reader (which keeps normal priority to notice falling behind)."""
        share = self._share
        if share is None:
            return
        with self._share_lock:
            new = change(share)
            if new is None:
                return
            reader = self._reader_tid
            tids = [t.native_id for t in threading.enumerate() if t.native_id is not None]
            try:
                set_priority(new, [tid for tid in tids if tid != reader])
            except OSError as exc:  # refused after the probe said yes: stay as we are
                _log.warning("exporter priority unchanged", priority=new, error=str(exc))
                return
        if new == NORMAL and share.raised == 1:
            _log.info(
                "exporter process fell behind; it takes a fair share of the CPU until it "
                "catches up (counted in its cpu.raised counter)"
            )

    def _observe_intake(self) -> None:
        backlog = self.intake.backlog
        now = time.monotonic()
        self._set_priority(lambda share: share.observe(now, backlog))

    def _read(self) -> None:
        """The reader thread: batches into the intake until STOP or EOF."""
        while True:
            try:
                msg = _unframe(self.conn.recv_bytes())
            except (EOFError, OSError, ValueError, struct.error):
                self._set_priority(CpuShare.hold)  # the drain must not wait for spare time
                self.intake.stop(self.drain_timeout_s)  # the server is gone
                return
            if msg[0] == _BATCH:
                # Before the offer, which (with no spool) waits for room: the backlog
                # as the batches so far left it.
                self._observe_intake()
                self.intake.offer(msg[1], msg[2], self.ack_now)
            elif msg[0] == _ACTIVE:
                if self.builder.metrics is not None:
                    self.builder.metrics.active = msg[1]
            elif msg[0] == _STOP:
                # The server has stopped serving: its cores are free for the drain.
                _use_other_cores([])
                self._set_priority(CpuShare.hold)
                self.intake.stop(float(msg[1]))
                return

    def run(self) -> None:
        reader = threading.Thread(target=self._read, name="zerver-exporter-reader", daemon=True)
        reader.start()
        self._reader_tid = reader.native_id
        # Every thread but the reader takes spare CPU only, unless already behind.
        self._set_priority(lambda share: IDLE if share.mode == IDLE else None)
        self.send((_READY,))
        intake, builder = self.intake, self.builder
        try:
            while True:
                # Stopping with the backend down: leave the spool's records where they are.
                claim = not (intake.stopped and self.pipeline.backing_off())
                job = intake.take(0.05, claim=claim)
                if job is not None:
                    self._build(job)
                builder.settle()
                self._flush_acks()
                if (
                    intake.stopped
                    and intake.empty
                    and (job is None or time.monotonic() >= self._build_until())
                ):
                    break
        finally:
            self._finish()

    def _build_until(self) -> float:
        """While stopping, build until a second before the deadline (the pipeline
        needs that long to send its last batches); else without limit."""
        intake = self.intake
        return intake.stop_at - 1.0 if intake.stopped else float("inf")

    def _build(self, job: tuple[int, list[bytes]] | SpoolItem) -> None:
        if isinstance(job, tuple):
            seq, blobs = job
            if self.intake.stopped and self.pipeline.backing_off() and self._spill(blobs):
                self.ack_now([seq])  # the backend is down: keep the records unbuilt
                return
            rest = self.builder.build(blobs, self._build_until(), self._ack_later(seq))
            if rest and not self._spill(rest):
                self.intake.lost += len(rest)
            return
        item = job
        try:
            if item.meta.get("schema") != PACK_SCHEMA:
                raise ValueError(f"records packed with schema {item.meta.get('schema')!r}")
            blobs = marshal.loads(item.body)
        except (ValueError, EOFError, TypeError) as exc:
            assert self.spool is not None
            self.spool.ack(item)
            self.intake.lost += item.count
            _log.warning("spooled records unreadable; dropped", records=item.count, error=str(exc))
            return
        rest = self.builder.build(blobs, self._build_until(), self._spool_ack(item))
        if rest and not self._spill(rest):
            self.intake.lost += len(rest)

    def _spill(self, blobs: list[bytes]) -> bool:
        spool = self.spool
        if spool is None or not spool.put(
            "records", marshal.dumps(blobs), len(blobs), _records_meta()
        ):
            return False
        self.intake.spilled += len(blobs)
        return True

    def _flush_acks(self) -> None:
        """Acknowledge what settled; the counters go along twice a second."""
        with self._acks_lock:
            acks, self._acks = self._acks, []
        now = time.monotonic()
        due = now - self._last_report > 0.5
        if due:
            self._last_report = now
        if acks or due:
            self.send((_ACK, acks, self.counters() if due else None))

    def _finish(self) -> None:
        """Spool what could not be built, shut the pipeline down, report, exit."""
        for seq, blobs in self.intake.drain_memory():
            if not self._spill(blobs):
                self.intake.lost += len(blobs)
            self.ack_now([seq])
        left = max(0.1, self.intake.stop_at - time.monotonic()) if self.intake.stopped else 1.0
        # The metrics' last export comes after the spans' (it counts them), with a
        # reserve of the time left so a slow span drain cannot take all of it.
        reserve = min(2.0, left / 4) if self.builder.metrics is not None else 0.0
        self.pipeline.shutdown(max(0.1, left - reserve), close_spool=False)
        self.builder.close_metrics(
            max(0.1, self.intake.stop_at - time.monotonic()) if self.intake.stopped else reserve
        )
        self.builder.settle()
        with self._acks_lock:
            acks, self._acks = self._acks, []
        self.send((_FINAL, acks, self.counters()))
        if self.spool is not None:
            self.spool.close()
        with contextlib.suppress(OSError):
            self.conn.close()


# -- the request process's side ----------------------------------------------------------


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while a child is spawned: it inherits the
    mask, so a Ctrl-C during its start-up waits until it ignores them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Child:
    """One exporter process and the server's end of its pipe."""

    __slots__ = ("conn", "final", "process", "ready", "started_at")

    def __init__(self, spec: EngineSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process: BaseProcess = ctx.Process(
            target=_child_main, args=(child_conn, spec), name="zerver-exporter", daemon=True
        )
        with _signals_blocked():
            self.process.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.final = False

    def exit_description(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit code {code}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        with contextlib.suppress(ValueError):
            self.process.close()


class ProcessTraceSubscriber:
    """A :class:`~zerver.trace.Subscriber` that builds and exports traces in another process.

    ``stats()`` gives this side's counters and the exporter's latest (its
    :class:`~zerver.export.ExportStats` as a dict under ``"export"``), summed over
    every exporter process this subscriber has run.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        max_pending: int = 16_384,
        batch: int = 128,
        flush_interval_s: float = 0.05,
        window: int = 64,
        max_restarts: int = 5,
        active: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self.spec = spec
        self.max_pending = max_pending
        self.batch = batch
        self.flush_interval_s = flush_interval_s
        self.window = window
        self.max_restarts = max_restarts
        # With tail triggers a head-dropped record may still be kept: the exporter
        # process decides, so it gets every record.
        # So do metrics, which count every request.
        self._keep_unsampled = bool(spec.settings.sampler_spec.tail) or spec.metrics is not None
        self.records_submitted = 0
        self.records_dropped = 0
        self.records_sent = 0
        """Records the exporter acknowledged (built and settled, or spooled by it)."""
        self.records_spooled = 0
        """Records this process wrote to the spool (exporter down or behind, shutdown)."""
        self.records_lost = 0
        """Records that could be neither handed over nor spooled (no spool, or it was full)."""
        self.unsampled = 0
        self.restarts = 0
        self.child_stats: dict[str, Any] = {}
        self._dead_stats: list[dict[str, Any]] = []
        # deque.append and popleft are atomic under the GIL: no lock on the request path.
        self._pending: deque[bytes] = deque()
        self._unacked: dict[int, list[bytes]] = {}
        self._resend: deque[tuple[int, list[bytes]]] = deque()
        self._seq = 0
        self._failures = 0  # exporters in a row that died before running _STABLE_S
        self._restart_at = 0.0
        self._wake = threading.Event()
        self._closed = False
        self._stop_at = 0.0
        self._abandoned = False
        self._spool: Spool | None = None
        self._fallback: _Builder | None = None
        self._drops = DropReporter("trace records dropped", self._drop_totals)
        self.active = active
        """The app's requests in flight (``App.active_requests``), sent to the
        exporter's metrics; None without metrics."""
        self._active_sent: dict[tuple[str, str], int] | None = None
        self._child: _Child | None = _Child(spec)
        self._thread = threading.Thread(target=self._feed, name="zerver-trace-feeder", daemon=True)
        self._thread.start()

    # -- request path ------------------------------------------------------------------

    def on_request_end(self, record: RequestRecord) -> None:
        if not record.trace_flags & 0x01 and not self._keep_unsampled:
            self.unsampled += 1
            return
        pending = self._pending
        if len(pending) >= self.max_pending or self._closed:
            self.records_dropped += 1
            self._drops.poke()
            return
        pending.append(handover_bytes(record))
        self.records_submitted += 1
        if len(pending) >= self.batch and not self._wake.is_set():
            self._wake.set()  # once: Event.set takes a lock and notifies every time

    # -- the feeder thread -------------------------------------------------------------

    def _feed(self) -> None:
        try:
            while True:
                self._wake.wait(self.flush_interval_s)
                self._wake.clear()
                if self._abandoned:
                    return
                self._poll_child()
                self._hand_over()
                self._send_active()
                if self._closed and not self._pending and not self._resend:
                    break
                if self._closed and time.monotonic() >= self._stop_at:
                    break
            self._stop_child()
        except Exception:  # a bug: never let it pass silently
            _log.exception("trace feeder failed")
        finally:
            self._settle_leftovers()

    def _take(self) -> tuple[int, list[bytes]] | None:
        if self._resend:
            return self._resend.popleft()
        pending = self._pending
        if not pending:
            return None
        blobs = [pending.popleft() for _ in range(min(len(pending), self.batch))]
        self._seq += 1
        return self._seq, blobs

    def _hand_over(self) -> None:
        """Send what is buffered while the window allows; spool the excess."""
        while self._pending or self._resend:
            if self._fallback is not None:
                batch = self._take()
                if batch is not None:
                    builder = self._fallback
                    rest = builder.build(batch[1], time.monotonic() + 1.0, _nothing)
                    builder.settle()
                    self.records_sent += len(batch[1]) - len(rest)
                    if rest:
                        self._spool_batch(rest)
                continue
            child = self._child
            if child is not None and child.ready and len(self._unacked) < self.window:
                batch = self._take()
                if batch is None:
                    return
                try:
                    child.conn.send_bytes(_frame_batch(*batch))
                except (OSError, ValueError):
                    self._resend.appendleft(batch)
                    self._poll_child()
                    continue
                self._unacked[batch[0]] = batch[1]
                continue
            stopping = self._closed and (child is None or time.monotonic() >= self._stop_at)
            if len(self._pending) < self.max_pending // 2 and not stopping:
                return  # the buffer can wait for the exporter a little longer
            batch = self._take()
            if batch is not None:
                self._spool_batch(batch[1])

    def _poll_child(self) -> None:
        """Read the exporter's messages; notice its death; restart it when due."""
        child = self._child
        if child is None:
            if self._fallback is None and time.monotonic() >= self._restart_at:
                self._start_child()
            return
        dead = False
        try:
            while child.conn.poll(0):
                self._on_message(child, marshal.loads(child.conn.recv_bytes()))
        except (EOFError, OSError, ValueError):
            dead = True
        if dead or not child.process.is_alive():
            self._on_death(child)

    def _on_message(self, child: _Child, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == _READY:
            child.ready = True
            return
        for seq in msg[1]:
            blobs = self._unacked.pop(seq, None)
            if blobs is not None:
                self.records_sent += len(blobs)
        if msg[2] is not None:
            self.child_stats = msg[2]
        if kind == _FINAL:
            child.final = True

    def _on_death(self, child: _Child) -> None:
        child.process.join(1.0)
        self._child = None
        if child.final:
            child.close()
            return
        how = child.exit_description()
        ran = time.monotonic() - child.started_at
        self._failures = 0 if child.ready and ran >= _STABLE_S else self._failures + 1
        self._dead_stats.append(self.child_stats)
        self.child_stats = {}
        # Everything it had not acknowledged goes to the next one, in order.
        self._resend.extendleft(reversed(sorted(self._unacked.items())))
        self._unacked.clear()
        child.close()
        if self._closed:
            _log.warning("exporter process died while stopping", exit=how)
            return
        if self._failures > self.max_restarts:
            _log.error(
                "exporter process keeps dying; building spans in this process from now on",
                exit=how,
                restarts=self.restarts,
            )
            self._fallback = _build_pipeline(self.spec, child=False)
            return
        delay = min(5.0, 0.1 * 2 ** max(0, self._failures - 1))
        self._restart_at = time.monotonic() + delay
        _log.warning(
            "exporter process died; restarting it",
            exit=how,
            records_to_resend=sum(len(b) for _, b in self._resend),
            restart_in_s=delay,
        )

    def _send_active(self) -> None:
        """The requests in flight, to the exporter's metrics, when they changed."""
        if self.active is None:
            return
        child = self._child
        if child is None or not child.ready:
            if self._fallback is not None and self._fallback.metrics is not None:
                self._fallback.metrics.active = self.active
            return
        now = self.active.copy()  # one C call: the event loop's thread may be adding keys
        if now == self._active_sent:
            return
        try:
            child.conn.send_bytes(_frame_active(now))
        except (OSError, ValueError):
            return  # the exporter is going; its successor gets the next snapshot
        self._active_sent = now

    def _start_child(self) -> None:
        self._active_sent = None
        try:
            self._child = _Child(self.spec)
            self.restarts += 1
        except Exception as exc:
            self._failures += 1
            self._restart_at = time.monotonic() + min(5.0, 0.1 * 2**self._failures)
            _log.warning("exporter process failed to start", error=repr(exc))

    def _open_spool(self) -> Spool | None:
        if self._spool is None and self.spec.export.spool_dir is not None:
            from zerver.export._spool import Spool

            try:
                self._spool = Spool(
                    self.spec.export.spool_dir, max_bytes=self.spec.export.spool_max_bytes
                )
            except Exception as exc:
                _log.error("trace spool unavailable", error=str(exc))
        return self._spool

    def _spool_batch(self, blobs: list[bytes]) -> None:
        spool = self._open_spool()
        if spool is not None and spool.put(
            "records", marshal.dumps(blobs), len(blobs), _records_meta()
        ):
            self.records_spooled += len(blobs)
        else:
            self.records_lost += len(blobs)
            self._drops.poke()

    def _stop_child(self) -> None:
        """Tell the exporter to finish within the time left and wait for it."""
        child = self._child
        if child is None:
            return
        # Sent even to an exporter still starting: it reads it once it is up.
        with contextlib.suppress(OSError, ValueError):
            child.conn.send_bytes(_frame_stop(max(0.5, self._stop_at - time.monotonic())))
        deadline = self._stop_at + 2.0
        while self._child is not None and not self._abandoned:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _log.warning("exporter process did not finish in time; killing it")
                child.process.kill()
                child.process.join(1.0)
                self._on_death(child)
                break
            with contextlib.suppress(OSError, ValueError):
                wait([child.conn, child.process.sentinel], min(remaining, 0.2))
            self._poll_child()

    def _settle_leftovers(self) -> None:
        """Whatever no exporter acknowledged goes to the spool (or is counted lost)."""
        if self._fallback is not None:
            while self._pending or self._resend:
                batch = self._take()
                if batch is not None:
                    self._spool_batch(batch[1])
            return
        leftovers = sorted(self._unacked.items())
        self._unacked.clear()
        leftovers.extend(self._resend)
        self._resend.clear()
        for _, blobs in leftovers:
            self._spool_batch(blobs)
        while self._pending:
            batch = self._take()
            if batch is not None:
                self._spool_batch(batch[1])

    # -- control -----------------------------------------------------------------------

    def _drop_totals(self) -> dict[str, int]:
        return {"records_dropped": self.records_dropped, "records_lost": self.records_lost}

    def stats(self) -> dict[str, Any]:
        """Counters of both sides (the exporter's as last reported, summed over restarts)."""
        exporter = _sum_stats([*self._dead_stats, self.child_stats])
        if self._fallback is not None:
            builder = self._fallback
            pipeline = builder.pipeline
            exporter = _sum_stats(
                [
                    exporter,
                    {
                        "built": builder.engine.built,
                        "errors": builder.engine.errors,
                        "unsampled": builder.engine.unsampled,
                        "export": asdict(pipeline.stats()),
                        **(
                            {"metrics": builder.metrics.counts()}
                            if builder.metrics is not None
                            else {}
                        ),
                    },
                ]
            )
        return {
            "records_submitted": self.records_submitted,
            "records_sent": self.records_sent,
            "records_dropped": self.records_dropped,
            "records_spooled": self.records_spooled,
            "records_lost": self.records_lost,
            "unsampled": self.unsampled,
            "restarts": self.restarts,
            "fallback": self._fallback is not None,
            "exporter": exporter,
        }

    def shutdown(self) -> None:
        """Hand everything over (or spool it) within the drain deadline, then log the
        totals. Called once, off the event loop, when the app stops."""
        if self._closed:
            return
        self._stop_at = time.monotonic() + self.spec.drain_timeout_s
        self._closed = True
        self._wake.set()
        self._thread.join(self.spec.drain_timeout_s + 5.0)
        if self._thread.is_alive() and self._child is not None:
            # Stuck writing to an exporter that stopped reading: killing it frees the pipe.
            self._child.process.kill()
            self._thread.join(5.0)
        if self._fallback is not None:
            self._fallback.pipeline.shutdown(max(0.1, self._stop_at - time.monotonic() - 1.0))
            self._fallback.close_metrics(max(0.1, self._stop_at - time.monotonic()))
        if self._spool is not None:
            self._spool.close()
        self._drops.close()
        self._log_totals("trace export stopped")

    def abandon(self) -> None:
        """Stop at once (a second signal): spool what this process holds, kill the
        exporter (what it held unacknowledged is spooled from here), log the totals."""
        if self._abandoned:
            return
        self._closed = True
        self._abandoned = True
        self._wake.set()
        child = self._child
        if child is not None and child.process.is_alive():
            child.process.kill()
        self._thread.join(1.0)
        if self._fallback is not None:
            self._fallback.pipeline.abandon()
        self._log_totals("trace export abandoned")

    def _log_totals(self, event: str) -> None:
        stats = self.stats()
        export = stats["exporter"].get("export", {})
        dropped = {k: v for k, v in dict(export.get("dropped", {})).items() if v}
        lost = self.records_dropped + self.records_lost + sum(dropped.values())
        spool = export.get("spool") or {}
        (_log.warning if lost else _log.info)(
            event,
            records=self.records_submitted,
            records_dropped=self.records_dropped,
            records_lost=self.records_lost + int(stats["exporter"].get("records_lost", 0)),
            records_spooled=self.records_spooled,
            records_spilled=int(stats["exporter"].get("records_spilled", 0)),
            spans_exported=export.get("exported", 0),
            spans_replayed=export.get("replayed", 0),
            spans_spooled=export.get("spooled", 0),
            spans_dropped=dropped,
            restarts=self.restarts,
            spool=self.spec.export.spool_dir,
            spool_items=spool.get("items", 0),
        )


def _sum_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters of several exporter processes added up (nested dicts key by key;
    non-numbers keep the last value)."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
                out[key] = value
            elif isinstance(value, dict):
                out[key] = _sum_stats([out.get(key) or {}, value])
            else:
                out[key] = out.get(key, 0) + value
    return out
