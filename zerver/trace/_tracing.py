"""The trace engine: a finished :class:`~zerver.trace.RequestRecord` becomes a span tree.

Sans-I/O: :meth:`TraceEngine.build` is a pure function of the record (plus
the promoter's rolling per-route statistics); the spans go to a
:class:`SpanSink`, which must only hand them off. The tree::

    SERVER   http.server: GET /blogs/posts/{id}
      INTERNAL step.route_match
      INTERNAL step.load_blog_post_page              (zerver.step.decision=Need)
        CLIENT   db.get blog_post                    (job.* durations as attributes)
          INTERNAL job.queue_wait                    (only when promoted)
          INTERNAL job.park(io_wait)                 (only when promoted)
        CLIENT   cache.get author_profile
      INTERNAL step.load_blog_post_page.resume       (the continuation's own job)

Span ids of steps and effects were reserved while the request ran (so spans
made through the OpenTelemetry API inside a step can name their parent);
only promoted spans get their ids here. Every span is closed: anything still
open at request end ends with the request and says so in its status.
"""

from __future__ import annotations

import os
import platform
import socket
import uuid
from collections.abc import Mapping
from types import MappingProxyType

from zerver._config import Settings
from zerver._specs import SamplerSpec
from zerver._version import __version__
from zerver.core._effects import effect_span_attributes
from zerver.export._sinks import SpanSink
from zerver.export._spans import (
    FLAG_HAS_REMOTE,
    FLAG_IS_REMOTE,
    NO_ATTRIBUTES,
    AttrValue,
    EventTuple,
    InstrumentationScope,
    Resource,
    SpanData,
    SpanKind,
    SpanLimits,
    SpanLink,
    StatusCode,
)

from ._promotion import Promoter, RollingPercentile, job_durations
from ._records import (
    CANCEL,
    COMPLETE,
    ExceptionFacts,
    JobState,
    NeedRecord,
    ParkEpisode,
    RequestRecord,
    StepRecord,
)
from ._sampling import TailSampler, tail_sampler
from ._semconv import SemConv

__all__ = ["SpanSink", "TraceEngine", "default_resource", "engine_from_settings"]

_JOB_END_EVENTS = frozenset({"zerver.job.completed", "zerver.job.failed"})
_new = object.__new__
# Status and kind values as module constants: a class attribute load is not
# specialised on CPython 3.11 and costs a type lookup each time, for every span
# built. A CPython 3.11 speed-up: re-measure with loadtest/bench_trace.py when the
# oldest supported Python specialises these loads, and go back to the enum names.
_UNSET, _OK, _ERROR = StatusCode.UNSET, StatusCode.OK, StatusCode.ERROR
_INTERNAL, _SERVER, _CLIENT = SpanKind.INTERNAL, SpanKind.SERVER, SpanKind.CLIENT
_PRODUCER, _CONSUMER = SpanKind.PRODUCER, SpanKind.CONSUMER


def default_resource(
    service_name: str,
    service_version: str,
    extra: Mapping[str, str] | None = None,
    *,
    sdk_version: str = "",
) -> Resource:
    """The resource every span of this process carries.

    ``extra`` (``OTEL_RESOURCE_ATTRIBUTES``) overrides the defaults except the
    ``telemetry.sdk.*`` keys; ``service_name`` (``OTEL_SERVICE_NAME`` or the
    app's name) always wins for ``service.name``.
    """
    attrs: dict[str, AttrValue] = {
        "service.name": service_name,
        "service.version": service_version,
        "service.instance.id": str(uuid.uuid4()),
        "deployment.environment": "development",
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
        "process.runtime.name": platform.python_implementation().lower(),
        "process.runtime.version": platform.python_version(),
    }
    if extra:
        attrs.update(extra)
    attrs["service.name"] = service_name
    attrs["telemetry.sdk.name"] = "zerver"
    attrs["telemetry.sdk.language"] = "python"
    attrs["telemetry.sdk.version"] = sdk_version
    return Resource(attributes=attrs)


def engine_from_settings(
    settings: Settings,
    sink: SpanSink,
    *,
    resource: Resource,
    interpreters: Mapping[str, object] | None = None,
) -> TraceEngine:
    """The trace engine ``settings`` describe (promotion, semantic conventions, job depth).

    The one place settings become an engine: the app's in-process engine and the
    exporter process's build the same spans from the same settings.
    """
    engine = TraceEngine(
        sink,
        promoter=Promoter(
            queue_ms=settings.promote_queue_ms,
            park_ms=settings.promote_park_ms,
            debug=settings.debug_jobs,
            window=settings.route_window,
            p95_min_ms=settings.promote_p95_min_ms,
        ),
        semconv=SemConv(settings.semconv_mode),
        resource=resource,
        scope=InstrumentationScope(name="zerver", version=__version__),
        export_job_depth=settings.export_job_depth,
        interpreters=interpreters,
        limits=SpanLimits.from_settings(settings),
        exception_stacktrace=settings.trace_exception_stacktrace,
    )
    spec = settings.sampler_spec
    if spec != SamplerSpec():  # anything but "every trace the caller did not refuse"
        engine.sampler = tail_sampler(
            spec, settings.route_window, min_wait_ms=settings.promote_p95_min_ms
        )
    return engine


def _park_attrs(ep: ParkEpisode) -> dict[str, AttrValue]:
    """The attributes of a park episode (on ``zerver.job.parked`` and ``job.park(...)``)."""
    attrs: dict[str, AttrValue] = {"job.park.cause": ep.cause}
    if ep.token is not None:
        attrs["job.park.token"] = ep.token
    if ep.limit_current is not None:
        attrs["concurrency.limit.current"] = ep.limit_current
    if ep.limit_max is not None:
        attrs["concurrency.limit.max"] = ep.limit_max
    return attrs


class _Builder:
    """What every span of one request shares, computed once per request."""

    __slots__ = ("end", "flags", "resource", "scope", "spans", "state", "trace_id", "wall")

    def __init__(self, rec: RequestRecord, resource: Resource, scope: InstrumentationScope):
        self.end = rec.end_ts if rec.end_ts is not None else rec.start_ts
        # Monotonic record time + wall = Unix nanoseconds.
        self.wall = rec.start_wall_ns - rec.start_ts
        self.trace_id = rec.trace_id
        self.state = rec.tracestate or ""
        self.flags = (rec.trace_flags & 0xFF) | FLAG_HAS_REMOTE
        self.resource = resource
        self.scope = scope
        self.spans: list[SpanData] = []

    def span(
        self,
        name: str,
        span_id: int,
        parent: int,
        kind: int,
        start_ts: int,
        end_ts: int,
        attrs: dict[str, AttrValue],
        events: list[EventTuple],
        status: int = _UNSET,
        message: str = "",
    ) -> SpanData:
        # SpanData's keyword constructor costs 3x this; every slot is set here.
        s: SpanData = _new(SpanData)
        s.name = name
        s.trace_id = self.trace_id
        s.span_id = span_id
        s.parent_span_id = parent
        s.kind = kind
        s.start_ns = self.wall + start_ts
        s.end_ns = self.wall + end_ts
        s.attributes = attrs
        s.events = events
        s.links = []
        s.status_code = status
        s.status_message = message
        s.trace_state = self.state
        s.flags = self.flags
        s.resource = self.resource
        s.scope = self.scope
        s.dropped_attributes_count = 0
        s.dropped_events_count = 0
        s.dropped_links_count = 0
        self.spans.append(s)
        return s


class TraceEngine:
    """Turns finished request records into spans and hands them to a sink.

    It is a :class:`~zerver.trace.Subscriber`: ``app.subscribe(engine)``.

    Building runs once per request, so it is written for speed: events are
    plain tuples, each job's durations, attributes, events and promotion are
    derived in one loop, and attribute dicts are written as displays where
    their keys are known.
    """

    def __init__(
        self,
        sink: SpanSink,
        *,
        promoter: Promoter | None = None,
        semconv: SemConv | None = None,
        resource: Resource | None = None,
        scope: InstrumentationScope | None = None,
        export_job_depth: bool = False,
        interpreters: Mapping[str, object] | None = None,
        limits: SpanLimits | None = None,
        exception_stacktrace: bool = True,
    ) -> None:
        self.sink = sink
        self.limits = limits if limits is not None else SpanLimits()
        self.exception_stacktrace = exception_stacktrace
        self.promoter = promoter if promoter is not None else Promoter()
        self.semconv = semconv if semconv is not None else SemConv("dup")
        self.resource = resource if resource is not None else Resource()
        self.scope = scope if scope is not None else InstrumentationScope(name="zerver")
        self.export_job_depth = export_job_depth
        # Interpreters may declare static span attributes (``span_attributes``,
        # e.g. {"db.system": "sqlite"}); read once, on first use.
        self._interpreters = interpreters
        self._static: dict[str, Mapping[str, AttrValue]] = {}
        self.built = 0
        self.unsampled = 0
        self.errors = 0
        # Set when sampling is configured (``ZER_VER_SAMPLER`` / ``OTEL_TRACES_SAMPLER``
        # other than the default): it decides which records become traces and why.
        self.sampler: TailSampler | None = None

    # -- Subscriber ---------------------------------------------------------------------

    def on_request_end(self, record: RequestRecord) -> None:
        spans = self.decide_and_build(record)
        if spans is None:
            self.unsampled += 1  # head-sampled out, and no tail trigger matched
            return
        self.built += 1
        self.sink.export(spans)

    def decide_and_build(self, record: RequestRecord) -> list[SpanData] | None:
        """The spans of ``record`` if it is kept, else ``None``.

        Without a sampler the head decision (the sampled flag) is final. With one,
        every record feeds its windows, and a kept record's root says why it was
        kept (``zerver.sampling.reason``); a tail keep exports the trace as sampled.
        """
        sampler = self.sampler
        if sampler is None:
            return self.build(record) if record.trace_flags & 0x01 else None
        reason = sampler.decide(record)
        if reason is None:
            return None
        record.trace_flags |= 0x01
        return self.build(record, reason)

    def shutdown(self) -> None:
        """Flush the sink (called when the app stops)."""
        close = getattr(self.sink, "shutdown", None)
        if close is not None:
            close()

    def abandon(self) -> None:
        """Stop the sink at once (a second signal), if it can."""
        abandon = getattr(self.sink, "abandon", None)
        if abandon is not None:
            abandon()

    # -- building -----------------------------------------------------------------------

    def build(self, rec: RequestRecord, reason: str | None = None) -> list[SpanData]:
        """The spans of one finished request, root first; ``reason`` (why sampling
        kept it) goes on the root as ``zerver.sampling.reason``."""
        b = _Builder(rec, self.resource, self.scope)
        end = b.end
        wall = b.wall

        root = (
            self._consumer_root(b, rec, end)
            if rec.kind == "consumer"
            else self._server_root(b, rec, end)
        )
        if rec.parent_remote:
            root.flags |= FLAG_IS_REMOTE
        if reason is not None:
            root.attributes["zerver.sampling.reason"] = reason
        root_id = rec.span_id

        # Spans by who may write slots: steps by index, jobs by index.
        step_spans: dict[int, SpanData] = {}
        job_spans: dict[int, SpanData] = {}
        cont_steps: dict[int, StepRecord] = {}
        for sr in rec.steps:
            if sr.layer == "continuation":
                if sr.job_index is not None:
                    cont_steps[sr.job_index] = sr
                continue
            step_spans[sr.index] = self._step_span(b, sr, root_id, rec.jobs)

        if rec.jobs:
            promoter = self.promoter
            stats = promoter.stats(rec.route or "")
            # Every job of the request is decided against the bars as they were before
            # its samples are observed: a sample never raises its own bar.
            queue_bar, park_bar = promoter.bars(stats)
            for job in rec.jobs:
                durations = job_durations(job, end)
                events = _lifecycle_events(job, wall, end)
                if job.exceptions is not None:
                    self._exception_events(job.exceptions, wall, events)
                if job.kind == "effect":
                    parent = step_spans.get(job.step_index)
                    span = self._effect_span(
                        b, rec, job, durations, events, parent.span_id if parent else root_id
                    )
                else:
                    csr = cont_steps.get(job.index)
                    span = self._continuation_span(b, rec, job, durations, events, csr, root_id)
                    if csr is not None:
                        step_spans[csr.index] = span
                job_spans[job.index] = span
                queue_wait = durations[0]
                if queue_wait >= queue_bar:
                    self._promote_queue_wait(b, rec, job, queue_wait, span.span_id)
                now = job.end_ts if job.end_ts is not None else end
                stats.queue.add(now, queue_wait)
                if job.park_episodes:
                    self._promote_parks(b, rec, job, span.span_id, park_bar, stats.park, now)

        # Slot writes, on the span of the step or job that wrote.
        for w in rec.slot_writes:
            target = (
                job_spans.get(w.job_index)
                if w.job_index is not None
                else step_spans.get(w.step_index)
                if w.step_index is not None
                else None
            )
            if target is not None:
                # An effect's result is stored as its job ends, a moment after end_ts:
                # the event stays within its span.
                at = wall + w.ts
                if at > target.end_ns:
                    at = target.end_ns
                target.events.append(
                    ("zerver.slot.write", at, {"slot": w.slot, "size_bytes": w.size_bytes}, 0)
                )
        self.limits.apply(b.spans)
        return b.spans

    def _exception_events(
        self, exceptions: list[ExceptionFacts], wall: int, events: list[EventTuple]
    ) -> None:
        """Add the semantic conventions' ``exception`` events in time order; one raised
        as its job ended comes before the job's ``completed``/``failed`` event."""
        last = events.pop() if events and events[-1][0] in _JOB_END_EVENTS else None
        for ts, etype, message, stack in exceptions:
            attrs: dict[str, AttrValue] = {"exception.type": etype, "exception.message": message}
            if self.exception_stacktrace:
                attrs["exception.stacktrace"] = stack
            events.append(("exception", wall + ts, attrs, 0))
        events.sort(key=_event_time)
        if last is not None:
            events.append(last)

    def _server_root(self, b: _Builder, rec: RequestRecord, end: int) -> SpanData:
        attrs = self.semconv.server_attributes(rec)
        for pname, pval in rec.params.items():
            attrs["url.path.params." + pname] = pval
        if rec.captured_headers:
            attrs.update(rec.captured_headers)
        attrs["zerver.request_id"] = rec.request_id
        status = _UNSET
        message = ""
        if rec.system_fault or rec.status >= 500:
            status = _ERROR
            message = rec.error_message or f"HTTP {rec.status}"
            if rec.error_id:
                attrs["zerver.error_id"] = rec.error_id
        name = (
            f"http.server: {rec.method} {rec.route}" if rec.route else f"http.server: {rec.method}"
        )
        return b.span(
            name,
            rec.span_id,
            rec.parent_span_id,
            _SERVER,
            rec.start_ts,
            end,
            attrs,
            [],
            status,
            message,
        )

    def _consumer_root(self, b: _Builder, rec: RequestRecord, end: int) -> SpanData:
        topic = rec.route or ""
        attrs: dict[str, AttrValue] = {
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": topic,
            "messaging.message.id": rec.message_id or "",
            "messaging.message.body.size": rec.message_size,
            "zerver.message.attempt": rec.message_attempt,
            "zerver.request_id": rec.request_id,
        }
        static = self._static_for("queue")
        if static:
            attrs.update(static)
        status, message = _UNSET, ""
        if rec.system_fault or rec.status >= 400:
            # For a consumer any failure is an error: the message is retried or dead-lettered.
            status, message = _ERROR, rec.error_message or f"failed ({rec.status})"
            attrs["error.type"] = rec.error_type or str(rec.status)
        root = b.span(
            f"queue.process {topic}",
            rec.span_id,
            rec.parent_span_id,
            _CONSUMER,
            rec.start_ts,
            end,
            attrs,
            [],
            status,
            message,
        )
        remote = FLAG_HAS_REMOTE | FLAG_IS_REMOTE  # links point at the messages' producers
        for trace_id, span_id, state in rec.links:
            root.links.append(SpanLink(trace_id, span_id, trace_state=state, flags=remote))
        return root

    def _static_for(self, system: str) -> Mapping[str, AttrValue]:
        static = self._static.get(system)
        if static is None:
            interp = self._interpreters.get(system) if self._interpreters else None
            found = getattr(interp, "span_attributes", None)
            static = self._static[system] = dict(found) if isinstance(found, Mapping) else {}
        return static

    @staticmethod
    def _step_extras(sr: StepRecord, attrs: dict[str, AttrValue]) -> None:
        """The step attributes that only some steps have."""
        if sr.resume is not None:
            attrs["zerver.step.resume"] = sr.resume
        if sr.render_phase is not None:
            attrs["render.phase"] = sr.render_phase
            attrs["render.size_bytes"] = sr.render_size or 0
        if sr.error_type is not None:
            attrs["error.type"] = sr.error_type

    def _step_span(self, b: _Builder, sr: StepRecord, root: int, jobs: list[JobState]) -> SpanData:
        attrs: dict[str, AttrValue] = {
            "zerver.step.sequence": sr.sequence,
            "zerver.step.layer": sr.layer,
            "zerver.step.decision": sr.decision or "Error",
            "zerver.step.reads": sr.reads,
            "zerver.step.writes": sr.writes,
        }
        if sr.resume is not None or sr.render_phase is not None or sr.error_type is not None:
            self._step_extras(sr, attrs)
        status, message = _UNSET, ""
        if sr.error_type is not None:
            status, message = _ERROR, sr.error_message or sr.error_type
        end = sr.end_ts
        if end is None:
            end = b.end
            if status == _UNSET:
                status, message = _ERROR, "step unfinished at request end"
        events: list[EventTuple] = []
        if sr.exceptions is not None:
            self._exception_events(sr.exceptions, b.wall, events)
        need = sr.need
        if need is not None:
            # The step's span covers the wait for its effects, so they nest inside it
            # (effects cancelled when the join resolved end a moment after it).
            join = need.join_ts if need.join_ts is not None else b.end
            if join > end:
                end = join
            for index in need.jobs:
                job_end = jobs[index].end_ts
                if job_end is None:
                    job_end = b.end
                if job_end > end:
                    end = job_end
            _need_events(need, b.wall, events)
        return b.span(
            "step." + sr.name,
            sr.span_id,
            root,
            _INTERNAL,
            sr.start_ts,
            end,
            attrs,
            events,
            status,
            message,
        )

    def _effect_span(
        self,
        b: _Builder,
        rec: RequestRecord,
        job: JobState,
        d: tuple[float, float, float, float, float],
        events: list[EventTuple],
        parent: int,
    ) -> SpanData:
        effect = job.effect
        assert effect is not None
        # The effect's own attributes come through its protocol (zerver.core._effects):
        # the engine knows no system. ``effect.kind`` ... and ``job.*`` first, each as
        # one dict display (the cheapest way to build a dict); a test checks the
        # job.* keys agree with _continuation_span's.
        attrs: dict[str, AttrValue] = {
            "effect.kind": effect.effect_kind,
            "effect.required": effect.required,
            "effect.timeout_ms": effect.timeout_ms,
            "job.queue": job.queue,
            "job.attempt": job.attempts,
            "job.queue_wait_ms": d[0],
            "job.dispatch_ms": d[1],
            "job.park_wait_ms_total": d[2],
            "job.run_active_ms": d[3],
            "job.park_count": len(job.park_episodes),
        }
        if job.worker is not None:
            attrs["job.worker_id"] = job.worker
        system = effect.system
        static = self._static.get(system)
        if static is None:
            static = self._static_for(system)
        if static:
            attrs.update(static)
        self.semconv.add_client_attributes(effect_span_attributes(effect, job.result_meta), attrs)
        outcome = job.outcome
        status, message = _OK, ""
        if outcome != COMPLETE:
            if outcome is not None:
                attrs["error.type"] = job.error_type or outcome
            status, message = self._failure_status(job, effect.required)
        start = job.enqueue_ts if job.enqueue_ts is not None else b.end
        end = job.end_ts if job.end_ts is not None else b.end
        return b.span(
            job.name,
            job.span_id or rec.new_span_id(),
            parent,
            _PRODUCER if effect.span_kind == "producer" else _CLIENT,
            start,
            end,
            attrs,
            events,
            status,
            message,
        )

    @staticmethod
    def _failure_status(job: JobState, required: bool) -> tuple[int, str]:
        """The status of a job that did not complete."""
        if job.outcome is None:
            return _ERROR, "job unfinished at request end"
        if job.outcome == CANCEL or not required:
            return _UNSET, ""
        return _ERROR, job.error_message or job.error_type or "failed"

    def _continuation_span(
        self,
        b: _Builder,
        rec: RequestRecord,
        job: JobState,
        d: tuple[float, float, float, float, float],
        events: list[EventTuple],
        sr: StepRecord | None,
        root: int,
    ) -> SpanData:
        attrs: dict[str, AttrValue]
        if sr is not None:
            decision = sr.decision or "Error"
            attrs = {
                "zerver.step.sequence": sr.sequence,
                "zerver.step.layer": sr.layer,
                "zerver.step.decision": decision,
                "zerver.step.reads": sr.reads,
                "zerver.step.writes": sr.writes,
                "zerver.resume.fn": sr.name,
                "zerver.decision": decision,
                "job.queue": job.queue,
                "job.attempt": job.attempts,
                "job.queue_wait_ms": d[0],
                "job.dispatch_ms": d[1],
                "job.park_wait_ms_total": d[2],
                "job.run_active_ms": d[3],
                "job.park_count": len(job.park_episodes),
            }
            if sr.resume is not None or sr.render_phase is not None or sr.error_type is not None:
                self._step_extras(sr, attrs)
            if sr.exceptions is not None:
                self._exception_events(sr.exceptions, b.wall, events)
            span_id = sr.span_id
        else:  # never ran (cancelled while queued, or the queue was full)
            attrs = {
                "zerver.resume.fn": job.name.removeprefix("step.").removesuffix(".resume"),
                "job.queue": job.queue,
                "job.attempt": job.attempts,
                "job.queue_wait_ms": d[0],
                "job.dispatch_ms": d[1],
                "job.park_wait_ms_total": d[2],
                "job.run_active_ms": d[3],
                "job.park_count": len(job.park_episodes),
            }
            span_id = job.span_id or rec.new_span_id()
        if job.worker is not None:
            attrs["job.worker_id"] = job.worker
        # Steps are ERROR or UNSET, never OK.
        status, message = (
            (_UNSET, "") if job.outcome == COMPLETE else self._failure_status(job, True)
        )
        start = job.enqueue_ts if job.enqueue_ts is not None else b.end
        end = job.end_ts if job.end_ts is not None else b.end
        if sr is not None and sr.need is not None:
            join = sr.need.join_ts
            if join is None:
                join = b.end
            if join > end:
                end = join
            for index in sr.need.jobs:
                job_end = rec.jobs[index].end_ts
                if job_end is None:
                    job_end = b.end
                if job_end > end:
                    end = job_end
            _need_events(sr.need, b.wall, events)
        return b.span(
            job.name, span_id, root, _INTERNAL, start, end, attrs, events, status, message
        )

    def _promote_queue_wait(
        self, b: _Builder, rec: RequestRecord, job: JobState, queue_wait_ms: float, parent: int
    ) -> None:
        """Add the job's ``job.queue_wait`` span (it waited at least the bar).

        A job never taken (cancelled while queued) waited until it ended: its
        whole wait is its queue wait, promoted like any other."""
        if job.enqueue_ts is None:
            return
        taken = job.take_ts
        if taken is None:
            taken = job.end_ts if job.end_ts is not None else b.end
        attrs: dict[str, AttrValue] = {"job.queue": job.queue, "job.queue_wait_ms": queue_wait_ms}
        if self.export_job_depth:
            attrs["job.depth_start"] = job.depth_enqueue or 0
            attrs["job.depth_end"] = job.depth_take or 0
        b.span(
            "job.queue_wait",
            rec.new_span_id(),
            parent,
            _INTERNAL,
            job.enqueue_ts,
            taken,
            attrs,
            [],
        )

    @staticmethod
    def _promote_parks(
        b: _Builder,
        rec: RequestRecord,
        job: JobState,
        parent: int,
        park_bar: float,
        samples: RollingPercentile,
        now: int,
    ) -> None:
        """Add a ``job.park(<cause>)`` span per episode at least the bar; observe each."""
        for ep in job.park_episodes:
            resume = ep.resume_ts if ep.resume_ts is not None else b.end
            ms = (resume - ep.park_ts) / 1e6
            if ms >= park_bar:
                pattrs = _park_attrs(ep)
                pattrs["job.park_wait_ms"] = ms
                b.span(
                    f"job.park({ep.cause})",
                    rec.new_span_id(),
                    parent,
                    _INTERNAL,
                    ep.park_ts,
                    resume,
                    pattrs,
                    [],
                )
            samples.add(now, ms)


def _event_time(event: EventTuple) -> int:
    return event[1]


def _need_events(need: NeedRecord, wall: int, events: list[EventTuple]) -> None:
    """Append ``zerver.need.requested`` and, once joined, ``zerver.need.join``."""
    events.append(
        (
            "zerver.need.requested",
            wall + need.requested_ts,
            {"need.effects": need.n_effects, "need.mode": need.mode, "need.join": need.join},
            0,
        )
    )
    if need.join_ts is not None:
        events.append(
            (
                "zerver.need.join",
                wall + need.join_ts,
                {
                    "need.completed": need.completed,
                    "need.failed": need.failed,
                    "need.duration_ms": (need.join_ts - need.requested_ts) / 1e6,
                },
                0,
            )
        )


def _lifecycle_events(job: JobState, wall: int, end: int) -> list[EventTuple]:
    """The job's ``zerver.job.*`` (and ``zerver.retry``) events in time order."""
    enq, take, start = job.enqueue_ts, job.take_ts, job.start_ts
    end_ts = wall + (job.end_ts if job.end_ts is not None else end)
    ev: list[EventTuple] = []
    if enq is not None:
        ev.append(
            (
                "zerver.job.enqueued",
                wall + enq,
                {"job.queue": job.queue, "job.depth": job.depth_enqueue or 0},
                0,
            )
        )
    if take is not None:
        worker = job.worker
        taken = _TAKEN.get(worker) or _taken_attrs(worker)
        ev.append(("zerver.job.taken", wall + take, taken, 0))
    if start is not None:
        ev.append(("zerver.job.started", wall + start, NO_ATTRIBUTES, 0))
    parks = job.park_episodes
    if len(parks) == 1 and not job.retries:
        ep = parks[0]
        resume = ep.resume_ts if ep.resume_ts is not None else end
        ev.append(("zerver.job.parked", wall + ep.park_ts, _park_attrs(ep), 0))
        ev.append(("zerver.job.resumed", wall + resume, NO_ATTRIBUTES, 0))
    elif parks or job.retries:
        # At one instant: a resume ends the earlier episode, then a retry, then a park;
        # the running number keeps the sort stable and off the event tuples.
        timed: list[tuple[int, int, int, EventTuple]] = []
        for ep in parks:
            timed.append(
                (
                    ep.park_ts,
                    2,
                    len(timed),
                    ("zerver.job.parked", wall + ep.park_ts, _park_attrs(ep), 0),
                )
            )
            resume = ep.resume_ts if ep.resume_ts is not None else end
            timed.append(
                (resume, 0, len(timed), ("zerver.job.resumed", wall + resume, NO_ATTRIBUTES, 0))
            )
        for r in job.retries:
            retry: dict[str, AttrValue] = {
                "attempt": r.attempt,
                "reason": r.reason,
                "backoff_ms": r.backoff_ms,
            }
            timed.append((r.ts, 1, len(timed), ("zerver.retry", wall + r.ts, retry, 0)))
        timed.sort()
        ev.extend(t[3] for t in timed)
    if job.outcome == COMPLETE:
        attempts = job.attempts
        completed = _COMPLETED.get(attempts) or _completed_attrs(attempts)
        ev.append(("zerver.job.completed", end_ts, completed, 0))
    else:
        ev.append(
            (
                "zerver.job.failed",
                end_ts,
                {
                    "error.type": job.error_type or job.outcome or "unfinished",
                    "error.message": job.error_message or "",
                },
                0,
            )
        )
    return ev


# Read-only attribute maps shared by the events that carry the same values
# (worker ids and attempt counts are small numbers); bounded.
_TAKEN: dict[int | None, Mapping[str, AttrValue]] = {}
_COMPLETED: dict[int, Mapping[str, AttrValue]] = {}
_SHARED_MAX = 256


def _taken_attrs(worker: int | None) -> Mapping[str, AttrValue]:
    attrs = _TAKEN.get(worker)
    if attrs is None:
        attrs = MappingProxyType({"job.worker_id": worker if worker is not None else -1})
        if len(_TAKEN) < _SHARED_MAX:
            _TAKEN[worker] = attrs
    return attrs


def _completed_attrs(attempts: int) -> Mapping[str, AttrValue]:
    attrs = _COMPLETED.get(attempts)
    if attrs is None:
        attrs = MappingProxyType({"job.success": True, "job.attempts": attempts})
        if len(_COMPLETED) < _SHARED_MAX:
            _COMPLETED[attempts] = attrs
    return attrs
