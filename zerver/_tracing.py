"""The trace engine: a finished :class:`~zerver.RequestRecord` becomes a span tree.

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
from typing import Protocol

from ._effects import Effect
from ._promotion import JobDurations, Promoter, RouteStats
from ._records import CANCEL, COMPLETE, JobState, ParkEpisode, RequestRecord, StepRecord
from ._semconv import ClientFacts, SemConv
from ._spans import (
    AttrValue,
    InstrumentationScope,
    Resource,
    SpanData,
    SpanEvent,
    SpanKind,
    SpanLink,
    StatusCode,
    make_span,
)

__all__ = ["SpanSink", "TraceEngine", "default_resource"]

_EFFECT_KINDS = frozenset({"db", "http", "cache", "kv", "queue", "fs"})
_MAX_KEY = 128
# W3C flags in the low byte; 0x100: "is the parent remote" is known; 0x200: it is.
_HAS_REMOTE = 0x100
_IS_REMOTE = 0x200


class SpanSink(Protocol):
    """Receives each request's finished spans. Must be cheap and must not block."""

    def export(self, spans: list[SpanData]) -> None: ...


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


def _sanitise_key(key: str) -> str:
    if len(key) > _MAX_KEY:
        key = key[:_MAX_KEY] + "…"
    if key.isprintable():
        return key
    return "".join(c if c.isprintable() else "?" for c in key)


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
    """State for building one request's spans."""

    __slots__ = ("end", "spans", "t0", "w0")

    def __init__(self, rec: RequestRecord) -> None:
        self.t0 = rec.start_ts
        self.w0 = rec.start_wall_ns
        self.end = rec.end_ts if rec.end_ts is not None else rec.start_ts
        self.spans: list[SpanData] = []


class TraceEngine:
    """Turns finished request records into spans and hands them to a sink.

    It is a :class:`~zerver.Subscriber`: ``app.subscribe(engine)``.
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
    ) -> None:
        self.sink = sink
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

    # -- Subscriber ---------------------------------------------------------------------

    def on_request_end(self, record: RequestRecord) -> None:
        if not record.trace_flags & 0x01:
            self.unsampled += 1  # the caller decided not to sample this trace
            return
        spans = self.build(record)
        self.built += 1
        self.sink.export(spans)

    def shutdown(self) -> None:
        """Flush the sink (called when the app stops)."""
        close = getattr(self.sink, "shutdown", None)
        if close is not None:
            close()

    # -- building -----------------------------------------------------------------------

    def _span(
        self,
        b: _Builder,
        rec: RequestRecord,
        name: str,
        span_id: int,
        parent: int,
        kind: int,
        start_ts: int,
        end_ts: int,
        attrs: dict[str, AttrValue],
        events: list[SpanEvent] | None = None,
        status: int = StatusCode.UNSET,
        message: str = "",
    ) -> SpanData:
        w0, t0 = b.w0, b.t0
        span = make_span(
            name,
            rec.trace_id,
            span_id,
            parent,
            kind,
            w0 + (start_ts - t0),
            w0 + (end_ts - t0),
            attrs,
            events if events is not None else [],
            status,
            message,
            rec.tracestate or "",
            (rec.trace_flags & 0xFF) | _HAS_REMOTE,
            self.resource,
            self.scope,
        )
        b.spans.append(span)
        return span

    def build(self, rec: RequestRecord) -> list[SpanData]:
        """The spans of one finished request, root first."""
        b = _Builder(rec)
        end = b.end
        wall = b.w0 - b.t0

        # Root.
        if rec.kind == "consumer":
            root = self._consumer_root(b, rec, end)
        else:
            attrs: dict[str, AttrValue] = {}
            self.semconv.server_attributes(rec, attrs)
            for pname, pval in rec.params.items():
                attrs["url.path.params." + pname] = pval
            attrs["zerver.request_id"] = rec.request_id
            status = StatusCode.UNSET
            message = ""
            if rec.system_fault or rec.status >= 500:
                status = StatusCode.ERROR
                message = rec.error_message or f"HTTP {rec.status}"
                if rec.error_id:
                    attrs["zerver.error_id"] = rec.error_id
            name = (
                f"http.server: {rec.method} {rec.route}"
                if rec.route
                else f"http.server: {rec.method}"
            )
            root = self._span(
                b,
                rec,
                name,
                rec.span_id,
                rec.parent_span_id,
                SpanKind.SERVER,
                rec.start_ts,
                end,
                attrs,
                None,
                status,
                message,
            )
        if rec.parent_remote:
            root.flags |= _IS_REMOTE
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
            step_spans[sr.index] = self._step_span(b, rec, sr, root_id)

        route_key = rec.route or ""
        promoter = self.promoter
        stats = promoter.stats(route_key)
        for job in rec.jobs:
            d = JobDurations(job, end)
            if job.kind == "effect":
                parent = step_spans.get(job.step_index)
                span = self._effect_span(b, rec, job, d, parent.span_id if parent else root_id)
            else:
                csr = cont_steps.get(job.index)
                span = self._continuation_span(b, rec, job, d, csr, root_id)
                if csr is not None:
                    step_spans[csr.index] = span
            job_spans[job.index] = span
            self._lifecycle_events(job, span, wall, end)
            self._promote(b, rec, job, d, span.span_id, stats)
            # Observe after deciding, so a sample never raises its own bar.
            now = job.end_ts if job.end_ts is not None else end
            stats.queue.add(now, d.queue_wait_ms)
            for ep in job.park_episodes:
                stats.park.add(now, ((ep.resume_ts or end) - ep.park_ts) / 1e6)

        # Events recorded on the request: needs and slot writes.
        for srec in rec.steps:
            need = srec.need
            nspan = step_spans.get(srec.index)
            if need is None or nspan is None:
                continue
            nspan.events.append(
                SpanEvent(
                    "zerver.need.requested",
                    wall + need.requested_ts,
                    {
                        "need.effects": need.n_effects,
                        "need.mode": need.mode,
                        "need.join": need.join,
                    },
                )
            )
            if need.join_ts is not None:
                nspan.events.append(
                    SpanEvent(
                        "zerver.need.join",
                        wall + need.join_ts,
                        {
                            "need.completed": need.completed,
                            "need.failed": need.failed,
                            "need.duration_ms": (need.join_ts - need.requested_ts) / 1e6,
                        },
                    )
                )
        for w in rec.slot_writes:
            target: SpanData | None = None
            if w.job_index is not None:
                target = job_spans.get(w.job_index)
            elif w.step_index is not None:
                target = step_spans.get(w.step_index)
            if target is not None:
                target.events.append(
                    SpanEvent(
                        "zerver.slot.write",
                        wall + w.ts,
                        {"slot": w.slot, "size_bytes": w.size_bytes},
                    )
                )
        return b.spans

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
        status, message = StatusCode.UNSET, ""
        if rec.system_fault or rec.status >= 400:
            # For a consumer any failure is an error: the message is retried or dead-lettered.
            status, message = StatusCode.ERROR, rec.error_message or f"failed ({rec.status})"
            attrs["error.type"] = rec.error_type or str(rec.status)
        root = self._span(
            b,
            rec,
            f"queue.process {topic}",
            rec.span_id,
            rec.parent_span_id,
            SpanKind.CONSUMER,
            rec.start_ts,
            end,
            attrs,
            None,
            status,
            message,
        )
        for trace_id, span_id, state in rec.links:
            root.links.append(SpanLink(trace_id, span_id, trace_state=state, flags=0x100 | 0x200))
        return root

    def _static_for(self, system: str) -> Mapping[str, AttrValue]:
        static = self._static.get(system)
        if static is None:
            interp = self._interpreters.get(system) if self._interpreters else None
            found = getattr(interp, "span_attributes", None)
            static = self._static[system] = dict(found) if isinstance(found, Mapping) else {}
        return static

    def _step_attrs(self, sr: StepRecord) -> dict[str, AttrValue]:
        attrs: dict[str, AttrValue] = {
            "zerver.step.sequence": sr.sequence,
            "zerver.step.layer": sr.layer,
            "zerver.step.decision": sr.decision or "Error",
            "zerver.step.reads": sr.reads,
            "zerver.step.writes": sr.writes,
        }
        if sr.resume is not None:
            attrs["zerver.step.resume"] = sr.resume
        return attrs

    def _step_span(self, b: _Builder, rec: RequestRecord, sr: StepRecord, root: int) -> SpanData:
        attrs = self._step_attrs(sr)
        status, message = StatusCode.UNSET, ""
        if sr.error_type is not None:
            status, message = StatusCode.ERROR, sr.error_message or sr.error_type
            attrs["error.type"] = sr.error_type
        end = sr.end_ts if sr.end_ts is not None else b.end
        if sr.end_ts is None and status == StatusCode.UNSET:
            status, message = StatusCode.ERROR, "step unfinished at request end"
        need = sr.need
        if need is not None:
            # The step's span covers the wait for its effects, so they nest inside it.
            join = need.join_ts if need.join_ts is not None else b.end
            end = max(end, join)
        if sr.render_phase is not None:
            attrs["render.phase"] = sr.render_phase
            attrs["render.size_bytes"] = sr.render_size or 0
        return self._span(
            b,
            rec,
            "step." + sr.name,
            sr.span_id,
            root,
            SpanKind.INTERNAL,
            sr.start_ts,
            end,
            attrs,
            [],
            status,
            message,
        )

    @staticmethod
    def _job_attrs(attrs: dict[str, AttrValue], job: JobState, d: JobDurations) -> None:
        attrs["job.queue"] = job.queue
        if job.worker is not None:
            attrs["job.worker_id"] = job.worker
        attrs["job.attempt"] = job.attempts
        attrs["job.queue_wait_ms"] = d.queue_wait_ms
        attrs["job.dispatch_ms"] = d.dispatch_ms
        attrs["job.park_wait_ms_total"] = d.park_wait_ms_total
        attrs["job.run_active_ms"] = d.run_active_ms
        attrs["job.park_count"] = d.park_count

    def _outcome_status(self, job: JobState, required: bool) -> tuple[int, str]:
        if job.outcome == COMPLETE:
            return StatusCode.OK, ""
        if job.outcome is None:
            return StatusCode.ERROR, "job unfinished at request end"
        if job.outcome == CANCEL:
            return StatusCode.UNSET, ""
        if required:
            return StatusCode.ERROR, job.error_message or job.error_type or "failed"
        return StatusCode.UNSET, ""

    def _effect_span(
        self, b: _Builder, rec: RequestRecord, job: JobState, d: JobDurations, parent: int
    ) -> SpanData:
        effect = job.effect
        assert effect is not None
        system = effect.system
        attrs: dict[str, AttrValue] = {
            "effect.kind": system if system in _EFFECT_KINDS else "other",
            "effect.required": effect.required,
            "effect.timeout_ms": effect.timeout_ms,
        }
        self._job_attrs(attrs, job, d)
        static = self._static_for(system)
        if static:
            attrs.update(static)
        meta = job.result_meta
        self._system_attrs(attrs, effect, meta)
        if job.outcome is not None and job.outcome != COMPLETE:
            attrs["error.type"] = job.error_type or job.outcome
        status, message = self._outcome_status(job, effect.required)
        start = job.enqueue_ts if job.enqueue_ts is not None else b.end
        end = job.end_ts if job.end_ts is not None else b.end
        kind = SpanKind.PRODUCER if system == "queue" else SpanKind.CLIENT
        return self._span(
            b,
            rec,
            job.name,
            job.span_id or rec.new_span_id(),
            parent,
            kind,
            start,
            end,
            attrs,
            [],
            status,
            message,
        )

    def _system_attrs(
        self, attrs: dict[str, AttrValue], effect: Effect, meta: dict[str, object] | None
    ) -> None:
        system = effect.system
        if system == "db":
            attrs.setdefault("db.system", "other_sql")
            attrs["db.operation"] = effect.operation
            attrs["db.namespace"] = getattr(effect, "table", "")
            key = getattr(effect, "key", None)
            if isinstance(key, str):
                attrs["db.key"] = _sanitise_key(key)
            rows = meta.get("db.rows") if meta else None
            if isinstance(rows, int):
                attrs["db.response.returned_rows"] = rows
        elif system == "cache":
            attrs.setdefault("cache.system", "other")
            attrs["cache.operation"] = effect.operation
            if meta is not None and "cache.hit" in meta:
                attrs["cache.hit"] = bool(meta["cache.hit"])
        elif system == "queue":
            attrs["messaging.operation.type"] = "send"
            attrs["messaging.operation.name"] = effect.operation
            attrs["messaging.destination.name"] = getattr(effect, "topic", effect.target)
            if meta is not None:
                for key in ("messaging.message.id", "messaging.message.body.size"):
                    if key in meta:
                        value = meta[key]
                        if isinstance(value, str | int):
                            attrs[key] = value
        elif system == "http":
            status = meta.get("http.response.status_code") if meta else None
            facts = ClientFacts(
                effect.operation.upper(),
                getattr(effect, "url", ""),
                status if isinstance(status, int) else None,
            )
            self.semconv.client_attributes(facts, attrs)
            size = meta.get("http.response.body.size") if meta else None
            if isinstance(size, int):
                attrs["http.response.body.size"] = size

    def _continuation_span(
        self,
        b: _Builder,
        rec: RequestRecord,
        job: JobState,
        d: JobDurations,
        sr: StepRecord | None,
        root: int,
    ) -> SpanData:
        if sr is not None:
            attrs = self._step_attrs(sr)
            attrs["zerver.resume.fn"] = sr.name
            attrs["zerver.decision"] = sr.decision or "Error"
            if sr.render_phase is not None:
                attrs["render.phase"] = sr.render_phase
                attrs["render.size_bytes"] = sr.render_size or 0
            span_id = sr.span_id
        else:  # never ran (cancelled while queued, or the queue was full)
            attrs = {"zerver.resume.fn": job.name.removeprefix("step.").removesuffix(".resume")}
            span_id = job.span_id or rec.new_span_id()
        self._job_attrs(attrs, job, d)
        status, message = self._outcome_status(job, True)
        if status == StatusCode.OK:
            status = StatusCode.UNSET  # steps are ERROR or UNSET, never OK
        if sr is not None and sr.error_type is not None:
            attrs["error.type"] = sr.error_type
        start = job.enqueue_ts if job.enqueue_ts is not None else b.end
        end = job.end_ts if job.end_ts is not None else b.end
        if sr is not None and sr.need is not None:
            join = sr.need.join_ts
            end = max(end, join if join is not None else b.end)
        return self._span(
            b,
            rec,
            job.name,
            span_id,
            root,
            SpanKind.INTERNAL,
            start,
            end,
            attrs,
            [],
            status,
            message,
        )

    @staticmethod
    def _lifecycle_events(job: JobState, span: SpanData, wall: int, end: int) -> None:
        ev = span.events
        if job.enqueue_ts is not None:
            ev.append(
                SpanEvent(
                    "zerver.job.enqueued",
                    wall + job.enqueue_ts,
                    {"job.queue": job.queue, "job.depth": job.depth_enqueue or 0},
                )
            )
        if job.take_ts is not None:
            ev.append(
                SpanEvent(
                    "zerver.job.taken",
                    wall + job.take_ts,
                    {"job.worker_id": job.worker if job.worker is not None else -1},
                )
            )
        if job.start_ts is not None:
            ev.append(SpanEvent("zerver.job.started", wall + job.start_ts))
        if job.park_episodes or job.retries:
            timed: list[tuple[int, int, SpanEvent]] = []
            for ep in job.park_episodes:
                pattrs = _park_attrs(ep)
                timed.append(
                    (ep.park_ts, 2, SpanEvent("zerver.job.parked", wall + ep.park_ts, pattrs))
                )
                resume = ep.resume_ts if ep.resume_ts is not None else end
                timed.append((resume, 0, SpanEvent("zerver.job.resumed", wall + resume)))
            for r in job.retries:
                timed.append(
                    (
                        r.ts,
                        1,
                        SpanEvent(
                            "zerver.retry",
                            wall + r.ts,
                            {"attempt": r.attempt, "reason": r.reason, "backoff_ms": r.backoff_ms},
                        ),
                    )
                )
            # At one instant: a resume ends the earlier episode, then a retry, then a park.
            timed.sort(key=lambda t: (t[0], t[1]))
            ev.extend(t[2] for t in timed)
        end_ts = job.end_ts if job.end_ts is not None else end
        if job.outcome == COMPLETE:
            ev.append(
                SpanEvent(
                    "zerver.job.completed",
                    wall + end_ts,
                    {"job.success": True, "job.attempts": job.attempts},
                )
            )
        else:
            ev.append(
                SpanEvent(
                    "zerver.job.failed",
                    wall + end_ts,
                    {
                        "error.type": job.error_type or job.outcome or "unfinished",
                        "error.message": job.error_message or "",
                    },
                )
            )

    def _promote(
        self,
        b: _Builder,
        rec: RequestRecord,
        job: JobState,
        d: JobDurations,
        parent: int,
        stats: RouteStats,
    ) -> None:
        promoter = self.promoter
        if (
            job.enqueue_ts is not None
            and job.take_ts is not None
            and promoter.promote_queue(stats, d.queue_wait_ms)
        ):
            attrs: dict[str, AttrValue] = {
                "job.queue": job.queue,
                "job.queue_wait_ms": d.queue_wait_ms,
            }
            if self.export_job_depth:
                attrs["job.depth_start"] = job.depth_enqueue or 0
                attrs["job.depth_end"] = job.depth_take or 0
            self._span(
                b,
                rec,
                "job.queue_wait",
                rec.new_span_id(),
                parent,
                SpanKind.INTERNAL,
                job.enqueue_ts,
                job.take_ts,
                attrs,
            )
        for ep in job.park_episodes:
            resume = ep.resume_ts if ep.resume_ts is not None else b.end
            ms = (resume - ep.park_ts) / 1e6
            if promoter.promote_park(stats, ms):
                pattrs = _park_attrs(ep)
                pattrs["job.park_wait_ms"] = ms
                self._span(
                    b,
                    rec,
                    f"job.park({ep.cause})",
                    rec.new_span_id(),
                    parent,
                    SpanKind.INTERNAL,
                    ep.park_ts,
                    resume,
                    pattrs,
                )
