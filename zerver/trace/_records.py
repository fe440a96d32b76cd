"""Telemetry records: what happened during one request, as plain data.

Rules of this module (the contract the trace engine, debug pages and logs
rely on):

* Records are append-only and written only from the event loop thread that
  handles the request, so they need no lock and perform no I/O.
* Every timestamp is a monotonic nanosecond count from the app's injected
  :class:`~zerver.Clock`; ``RequestRecord.start_wall_ns`` anchors them to wall
  time (``wall = start_wall_ns + (ts - start_ts)``).
* A job moves ``ENQUEUE -> TAKE -> START -> [PARK <-> RESUME]* -> COMPLETE |
  FAIL | CANCEL``. Only the job system writes these fields; a phase that never
  happened stays ``None`` (derived durations count it as 0).
* Once :meth:`RequestRecord.finish` has run, nothing writes to the record
  again and subscribers may read it freely.
* Each record class declares its schema once, in ``SCHEMA``: the fields that
  leave the process, in order, with their types. The exporter process's packing
  and unpacking are generated from it (``zerver.trace._offload``); a slot not in
  ``SCHEMA`` is named in ``LOCAL`` (it stays in the process that ran the request).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, get_args

from zerver.core._effects import Effect

if TYPE_CHECKING:
    from zerver.core._clock import Clock

__all__ = [
    "RECORD_CLASSES",
    "ExceptionFacts",
    "JobState",
    "NeedRecord",
    "ParkEpisode",
    "RequestRecord",
    "RetryRecord",
    "SlotWrite",
    "StepRecord",
    "Subscriber",
]

#: Why a running job waits (the ``job.park(<cause>)`` span's cause).
ParkCause = Literal["io_wait", "rate_limit", "backpressure", "lock", "timer", "other"]
PARK_CAUSES: frozenset[str] = frozenset(get_args(ParkCause))
#: What a job runs: an effect (by an interpreter) or a continuation step.
JobKind = Literal["effect", "continuation"]
#: How a job ended.
Outcome = Literal["complete", "fail", "cancel"]

_default_ids = random.Random()

#: The request and span the current task works for (read by log processors).
active_span: ContextVar[tuple[RequestRecord, int] | None] = ContextVar(
    "zerver_active_span", default=None
)

#: The longest ``exception.stacktrace`` kept: its head and its tail (the innermost
#: frames and the message), with what was cut in between said in the text.
MAX_STACKTRACE = 4096
#: The longest ``exception.message`` kept.
MAX_EXCEPTION_MESSAGE = 1024

#: An exception as recorded where it was raised: ``(ts, type, message, stacktrace)``,
#: the ``exception`` event's facts (the OpenTelemetry SDK's ``record_exception``).
ExceptionFacts = tuple[int, str, str, str]

#: A record class's schema: ``(field, type)`` pairs, in packed order. A type is a
#: value type (packed as it is, so ``marshal``-able), another record class, one
#: of them or None, a list of them (packed as None when empty), or ``Effect |
#: None`` (packed as what the job's span needs of it: ``zerver.core._effects.SPAN_FACTS``
#: and its span attributes).
Schema = tuple[tuple[str, Any], ...]


def exception_facts(exc: BaseException, ts: int) -> ExceptionFacts:
    """What an ``exception`` event says of ``exc``, raised at ``ts``; the stack bounded."""
    stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(stack) > MAX_STACKTRACE:
        head = MAX_STACKTRACE // 4
        tail = MAX_STACKTRACE - head
        cut = len(stack) - head - tail
        stack = f"{stack[:head]}\n... ({cut} characters omitted) ...\n{stack[-tail:]}"
    message = str(exc)
    if len(message) > MAX_EXCEPTION_MESSAGE:
        message = message[:MAX_EXCEPTION_MESSAGE] + "..."
    return (ts, type(exc).__qualname__, message, stack)


# Job outcomes.
COMPLETE: Final = "complete"
FAIL: Final = "fail"
CANCEL: Final = "cancel"


class ParkEpisode:
    """One stretch during which a started job waited instead of working."""

    __slots__ = ("cause", "limit_current", "limit_max", "park_ts", "resume_ts", "token")
    SCHEMA: ClassVar[Schema] = (
        ("cause", str),
        ("park_ts", int),
        ("token", str | None),
        ("limit_current", int | None),
        ("limit_max", int | None),
        ("resume_ts", int | None),
    )
    LOCAL: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        cause: ParkCause,
        park_ts: int,
        token: str | None = None,
        limit_current: int | None = None,
        limit_max: int | None = None,
    ) -> None:
        self.cause = cause
        self.token = token
        self.park_ts = park_ts
        self.resume_ts: int | None = None
        self.limit_current = limit_current
        self.limit_max = limit_max

    def __repr__(self) -> str:
        return (
            f"ParkEpisode({self.cause!r}, token={self.token!r}, "
            f"{self.park_ts}->{self.resume_ts}, limit={self.limit_current}/{self.limit_max})"
        )


class RetryRecord:
    """A ``zerver.retry`` event: attempt ``attempt`` failed and will be retried."""

    __slots__ = ("attempt", "backoff_ms", "reason", "ts")
    SCHEMA: ClassVar[Schema] = (
        ("ts", int),
        ("attempt", int),
        ("reason", str),
        ("backoff_ms", float),
    )
    LOCAL: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ts: int, attempt: int, reason: str, backoff_ms: float) -> None:
        self.ts = ts
        self.attempt = attempt
        self.reason = reason
        self.backoff_ms = backoff_ms


class JobState:
    """The lifecycle of one job: an effect, or a continuation step.

    ``kind`` is ``"effect"`` or ``"continuation"``. ``step_index`` is the
    index in ``RequestRecord.steps`` of the step whose ``Need`` created the
    job; for a continuation, ``cont_step_index`` is the index of the step
    record of the continuation once it ran.
    """

    __slots__ = (
        "attempts",
        "cont_step_index",
        "depth_enqueue",
        "depth_take",
        "effect",
        "end_ts",
        "enqueue_ts",
        "error_message",
        "error_type",
        "exceptions",
        "index",
        "kind",
        "name",
        "outcome",
        "park_episodes",
        "queue",
        "result_meta",
        "retries",
        "span_id",
        "start_ts",
        "status_hint",
        "step_index",
        "success",
        "take_ts",
        "worker",
    )
    SCHEMA: ClassVar[Schema] = (
        ("index", int),
        ("kind", str),
        ("name", str),
        ("queue", str),
        ("step_index", int),
        ("effect", Effect | None),
        ("cont_step_index", int | None),
        ("span_id", int),
        ("enqueue_ts", int | None),
        ("take_ts", int | None),
        ("start_ts", int | None),
        ("end_ts", int | None),
        ("park_episodes", list[ParkEpisode]),
        ("worker", int | None),
        ("attempts", int),
        ("success", bool | None),
        ("outcome", str | None),
        ("error_type", str | None),
        ("error_message", str | None),
        ("status_hint", int | None),
        ("depth_enqueue", int | None),
        ("depth_take", int | None),
        ("retries", list[RetryRecord]),
        ("result_meta", dict[str, Any] | None),
        ("exceptions", list[ExceptionFacts] | None),
    )
    LOCAL: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        index: int,
        kind: JobKind,
        name: str,
        queue: str,
        step_index: int,
        effect: Effect | None = None,
    ) -> None:
        self.index = index
        self.kind = kind
        self.name = name
        self.queue = queue
        self.step_index = step_index
        self.effect = effect
        self.cont_step_index: int | None = None
        # The effect span's id, reserved when the job is created (0: none).
        self.span_id = 0
        self.enqueue_ts: int | None = None
        self.take_ts: int | None = None
        self.start_ts: int | None = None
        self.end_ts: int | None = None
        self.park_episodes: list[ParkEpisode] = []
        self.worker: int | None = None
        self.attempts = 0
        self.success: bool | None = None
        self.outcome: Outcome | None = None
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.status_hint: int | None = None
        self.depth_enqueue: int | None = None
        self.depth_take: int | None = None
        self.retries: list[RetryRecord] = []
        # Facts an interpreter reports about the result (e.g. ``cache.hit``).
        self.result_meta: dict[str, Any] | None = None
        # What the interpreter raised, one entry per failed attempt that raised.
        self.exceptions: list[ExceptionFacts] | None = None

    @property
    def required(self) -> bool:
        """Whether the request depends on this job (continuations always do)."""
        return self.effect.required if self.effect is not None else True

    def __repr__(self) -> str:
        return f"<JobState #{self.index} {self.kind} {self.name!r} {self.outcome}>"


class NeedRecord:
    """A ``Need`` a step returned: ``zerver.need.requested`` and ``zerver.need.join``."""

    __slots__ = (
        "completed",
        "failed",
        "jobs",
        "join",
        "join_ts",
        "mode",
        "n_effects",
        "requested_ts",
        "then",
    )
    SCHEMA: ClassVar[Schema] = (
        ("requested_ts", int),
        ("n_effects", int),
        ("mode", str),
        ("join", str),
        ("then", str | None),
        ("jobs", list[int]),
        ("join_ts", int | None),
        ("completed", int),
        ("failed", int),
    )
    LOCAL: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, requested_ts: int, n_effects: int, mode: str, join: str, then: str | None
    ) -> None:
        self.requested_ts = requested_ts
        self.n_effects = n_effects
        self.mode = mode
        self.join = join
        self.then = then
        self.jobs: list[int] = []
        self.join_ts: int | None = None
        self.completed = 0
        self.failed = 0


class SlotWrite:
    """A ``zerver.slot.write`` event; ``step_index``/``job_index`` say who wrote it."""

    __slots__ = ("job_index", "size_bytes", "slot", "step_index", "ts")
    SCHEMA: ClassVar[Schema] = (
        ("ts", int),
        ("slot", str),
        ("size_bytes", int),
        ("step_index", int | None),
        ("job_index", int | None),
    )
    LOCAL: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, ts: int, slot: str, size_bytes: int, step_index: int | None, job_index: int | None
    ) -> None:
        self.ts = ts
        self.slot = slot
        self.size_bytes = size_bytes
        self.step_index = step_index
        self.job_index = job_index


class StepRecord:
    """One step run. ``layer`` is ``route_match``, ``before``, ``route`` or ``continuation``."""

    __slots__ = (
        "decision",
        "end_ts",
        "error_message",
        "error_type",
        "exceptions",
        "index",
        "job_index",
        "layer",
        "name",
        "need",
        "reads",
        "render_phase",
        "render_size",
        "resume",
        "sequence",
        "span_id",
        "start_ts",
        "writes",
    )
    SCHEMA: ClassVar[Schema] = (
        ("index", int),
        ("span_id", int),
        ("name", str),
        ("layer", str),
        ("sequence", int),
        ("reads", tuple[str, ...]),
        ("writes", tuple[str, ...]),
        ("start_ts", int),
        ("end_ts", int | None),
        ("decision", str | None),
        ("resume", str | None),
        ("need", NeedRecord | None),
        ("job_index", int | None),
        ("error_type", str | None),
        ("error_message", str | None),
        ("render_phase", str | None),
        ("render_size", int | None),
        ("exceptions", list[ExceptionFacts] | None),
    )
    LOCAL: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        index: int,
        name: str,
        layer: str,
        sequence: int,
        reads: Sequence[str],
        writes: Sequence[str],
        start_ts: int,
        job_index: int | None = None,
    ) -> None:
        self.index = index
        self.span_id = 0
        self.name = name
        self.layer = layer
        self.sequence = sequence
        self.reads = reads
        self.writes = writes
        self.start_ts = start_ts
        self.end_ts: int | None = None
        self.decision: str | None = None
        self.resume: str | None = None
        self.need: NeedRecord | None = None
        self.job_index = job_index
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.render_phase: str | None = None
        self.render_size: int | None = None
        # What the step raised (at most one entry: a raising step ends there).
        self.exceptions: list[ExceptionFacts] | None = None

    def __repr__(self) -> str:
        return f"<StepRecord #{self.index} {self.name!r} {self.decision}>"


class RequestRecord:
    """Everything recorded about one request, from arrival to response."""

    __slots__ = (
        "baggage",
        "captured_headers",
        "client_address",
        "client_port",
        "clock",
        "current_job",
        "current_step",
        "end_ts",
        "error_id",
        "error_message",
        "error_type",
        "host",
        "ids",
        "jobs",
        "kind",
        "links",
        "message_attempt",
        "message_id",
        "message_size",
        "method",
        "otel_context",
        "params",
        "parent_remote",
        "parent_span_id",
        "path",
        "protocol_version",
        "query",
        "request_body_size",
        "request_id",
        "response_body_size",
        "route",
        "sampling_reason",
        "scheme",
        "server_address",
        "server_port",
        "slot_writes",
        "span_id",
        "start_ts",
        "start_wall_ns",
        "status",
        "steps",
        "system_fault",
        "trace_flags",
        "trace_id",
        "traceparent",
        "tracestate",
        "user_agent",
    )
    SCHEMA: ClassVar[Schema] = (
        ("start_ts", int),
        ("start_wall_ns", int),
        ("end_ts", int | None),
        ("kind", str),
        ("trace_id", int),
        ("span_id", int),
        ("parent_span_id", int),
        ("parent_remote", bool),
        ("trace_flags", int),
        ("traceparent", str | None),
        ("tracestate", str | None),
        ("baggage", dict[str, str] | None),
        ("links", list[tuple[int, int, str]]),
        ("method", str),
        ("route", str | None),
        ("path", str),
        ("query", str),
        ("params", dict[str, str]),
        ("scheme", str),
        ("host", str | None),
        ("user_agent", str | None),
        ("server_address", str | None),
        ("server_port", int | None),
        ("client_address", str | None),
        ("client_port", int | None),
        ("protocol_version", str),
        ("request_body_size", int),
        ("response_body_size", int),
        ("status", int),
        ("request_id", str),
        ("captured_headers", dict[str, list[str]] | None),
        ("message_id", str | None),
        ("message_size", int),
        ("message_attempt", int),
        ("system_fault", bool),
        ("error_type", str | None),
        ("error_message", str | None),
        ("error_id", str | None),
        ("steps", list[StepRecord]),
        ("jobs", list[JobState]),
        ("slot_writes", list[SlotWrite]),
    )
    #: The clock, the id source, the OpenTelemetry switch, what runs now and why this
    #: process's sampler kept the trace.
    LOCAL: ClassVar[tuple[str, ...]] = (
        "clock",
        "current_job",
        "current_step",
        "ids",
        "otel_context",
        "sampling_reason",
    )

    def __init__(self, clock: Clock, ids: random.Random | None = None) -> None:
        self.clock = clock
        self.ids = ids if ids is not None else _default_ids
        # Trace identity, fixed at arrival so user spans can nest under steps.
        self.trace_id = 0
        self.span_id = 0
        self.parent_span_id = 0
        self.parent_remote = False
        self.trace_flags = 0x01
        # Why a sampler in this process kept the trace (``zerver.sampling.reason``);
        # written by the tail sampler when it decides, so tracez can show it.
        self.sampling_reason: str | None = None
        # Whether steps run with their span as the current OpenTelemetry span.
        self.otel_context = False
        self.start_ts = clock.now_ns()
        self.start_wall_ns = clock.wall_ns()
        self.end_ts: int | None = None
        # "http" for a served request, "consumer" for a consumed message.
        self.kind = "http"
        self.message_id: str | None = None
        self.message_size = 0
        self.message_attempt = 0
        # Linked contexts (trace id, span id, trace state), e.g. a message's producer.
        self.links: list[tuple[int, int, str]] = []
        self.method = ""
        self.route: str | None = None
        self.path = ""
        self.query = ""
        self.params: dict[str, str] = {}
        self.scheme = "http"
        self.host: str | None = None
        self.user_agent: str | None = None
        self.server_address: str | None = None
        self.server_port: int | None = None
        self.client_address: str | None = None
        self.client_port: int | None = None
        self.protocol_version = "1.1"
        self.request_body_size = 0
        self.response_body_size = 0
        self.status = 0
        self.request_id = ""
        self.traceparent: str | None = None
        self.tracestate: str | None = None
        # W3C baggage received with the request (forwarded on outbound calls).
        self.baggage: dict[str, str] | None = None
        # Headers captured as span attributes (``http.request.header.<name>`` ...),
        # sanitised; only when the operator asked for them.
        self.captured_headers: dict[str, list[str]] | None = None
        self.steps: list[StepRecord] = []
        self.jobs: list[JobState] = []
        self.slot_writes: list[SlotWrite] = []
        # The step or continuation job currently running (for attributing slot writes).
        self.current_step: int | None = None
        self.current_job: int | None = None
        # A system fault: a step raised or the runtime broke (not an application Fail).
        self.system_fault = False
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.error_id: str | None = None

    def start_trace(self) -> None:
        """Fix the root's ids: a new trace unless a remote parent was continued."""
        if not self.parent_remote:
            self.trace_id = self.ids.getrandbits(128) or 1
        self.span_id = self.new_span_id()

    def new_span_id(self) -> int:
        """A fresh non-zero 64-bit span id."""
        return self.ids.getrandbits(64) or 1

    def slot_written(self, slot: str, size_bytes: int) -> None:
        self.slot_writes.append(
            SlotWrite(self.clock.now_ns(), slot, size_bytes, self.current_step, self.current_job)
        )

    def finish(self, status: int, response_body_size: int) -> None:
        self.status = status
        self.response_body_size = response_body_size
        self.end_ts = self.clock.now_ns()

    @property
    def duration_ns(self) -> int:
        return (self.end_ts or self.start_ts) - self.start_ts

    def __repr__(self) -> str:
        return f"<RequestRecord {self.method} {self.route or self.path} {self.status}>"


class Record(Protocol):
    """What every record class declares: its packed fields and the slots kept local."""

    SCHEMA: ClassVar[Schema]
    LOCAL: ClassVar[tuple[str, ...]]


#: Every record class, the request first (what the packing is generated for).
RECORD_CLASSES: tuple[type[Record], ...] = (
    RequestRecord,
    StepRecord,
    NeedRecord,
    JobState,
    ParkEpisode,
    RetryRecord,
    SlotWrite,
)


class Subscriber(Protocol):
    """Receives each finished :class:`RequestRecord` (trace engine, debug pages, logs).

    Called on the event loop right after the response is ready. It must be
    cheap and must not block; an exception is counted and logged, never
    raised into the request.
    """

    def on_request_end(self, record: RequestRecord) -> None: ...
