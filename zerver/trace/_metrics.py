"""Metrics derived from finished request records, through the OpenTelemetry metrics SDK.

:class:`RecordMetrics` is fed each finished :class:`~zerver.trace.RequestRecord` where
traces are built (the exporter process when it runs, else the server process),
for every request, sampled or not, and records RED and job-phase measurements on
instruments of an OpenTelemetry SDK ``MeterProvider`` (whose readers decide when
and where the points go, see :func:`zerver.export.meter_provider`) or of zerver's
own :class:`~zerver.trace._aggregate.Aggregator` (what the server uses: the same
points, collected into the SDK's ``MetricsData`` at a fraction of the cost per
measurement). It performs no I/O.

Rules of this module:

* A record is read, never written; it may be one rebuilt by
  ``zerver.trace._offload.unpack_record`` (its effects are views holding
  ``system``/``operation``; the target is read from the job's span name).
* Attributes are low-cardinality only: route templates (``http.route``, absent
  when no route matched), step, queue and effect names as the app declared them,
  methods outside the standard set as ``_OTHER``; never a raw path, id or query.
* A phase is measured only when both of its ends happened (a job refused by a
  full queue has no ``dispatch``); a missing phase is not recorded as 0.
* Exemplars: a measurement of a sampled request carries the trace id and the id
  of the span it belongs to (root, step, job); one of an unsampled request
  carries none. On an SDK provider it is recorded with a context whose current
  span is a ``NonRecordingSpan`` of that span, and the provider uses the SDK's
  ``TraceBasedExemplarFilter``: a sampled request may become an exemplar, an
  unsampled one never does. The flag is read when :meth:`RecordMetrics.record`
  runs, so call it after the tail-sampling decision.
* ``http.server.active_requests`` cannot come from finished records (a record
  arrives once, at the end): :meth:`RecordMetrics.request_started` and
  :meth:`RecordMetrics.request_ended` are called where requests begin and end.
* ``zerver.job.depth`` is the queue depth each job saw when it was enqueued (the
  last one seen wins): it moves only when jobs are enqueued, so an idle queue
  shows the depth of its last enqueue; an exact figure needs a callback on the
  running queues.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from zerver._version import __version__

from ._aggregate import Aggregator
from ._semconv import KNOWN_METHODS

if TYPE_CHECKING:
    from zerver.core._effects import Effect

    from ._records import JobState, RequestRecord

#: An attribute set as this module builds it (str and int values only).
Attrs: TypeAlias = Mapping[str, str | int]
#: Records one measurement: ``(value, attributes, trace_id, span_id)``; a span id
#: (0: none) makes the measurement an exemplar candidate.
Measure: TypeAlias = Callable[[float, Attrs, int, int], None]

__all__ = [
    "BODY_SIZE_BUCKETS",
    "HTTP_DURATION_BUCKETS",
    "HTTP_DURATION_BUCKETS_MS",
    "INSTRUMENTS",
    "PHASE_BUCKETS",
    "RecordMetrics",
]

#: ``http.server.request.duration`` (s): the semantic conventions' boundaries.
HTTP_DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
#: ``http.server.duration`` (ms, the old conventions): the same boundaries in ms.
HTTP_DURATION_BUCKETS_MS: tuple[float, ...] = tuple(b * 1000 for b in HTTP_DURATION_BUCKETS)
#: ``zerver.step.duration``, ``zerver.effect.duration`` and the ``zerver.job.*``
#: phases (s): finer at the low end, where queue waits and dispatch live.
PHASE_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Request and response body sizes (By).
BODY_SIZE_BUCKETS: tuple[float, ...] = (
    0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000,
)  # fmt: skip

#: Every instrument: name -> (unit, kind, semconv modes it exists in).
INSTRUMENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "http.server.request.duration": ("s", "histogram", ("new", "dup")),
    "http.server.duration": ("ms", "histogram", ("old", "dup")),
    "http.server.request.body.size": ("By", "histogram", ("new", "dup")),
    "http.server.response.body.size": ("By", "histogram", ("new", "dup")),
    "http.server.request.size": ("By", "histogram", ("old", "dup")),
    "http.server.response.size": ("By", "histogram", ("old", "dup")),
    "http.server.active_requests": ("{request}", "updowncounter", ("old", "new", "dup")),
    "zerver.step.duration": ("s", "histogram", ("old", "new", "dup")),
    "zerver.effect.duration": ("s", "histogram", ("old", "new", "dup")),
    "zerver.job.queue_wait": ("s", "histogram", ("old", "new", "dup")),
    "zerver.job.dispatch": ("s", "histogram", ("old", "new", "dup")),
    "zerver.job.park_wait": ("s", "histogram", ("old", "new", "dup")),
    "zerver.job.run_active": ("s", "histogram", ("old", "new", "dup")),
    "zerver.job.retries": ("{retry}", "counter", ("old", "new", "dup")),
    "zerver.job.depth": ("{job}", "gauge", ("old", "new", "dup")),
    "zerver.cache.hits": ("{operation}", "counter", ("old", "new", "dup")),
    "zerver.cache.misses": ("{operation}", "counter", ("old", "new", "dup")),
}

_MODES = ("old", "new", "dup")
# Attribute sets kept per RecordMetrics; past this the cache starts over (the
# SDK keeps its own series; this only saves building the dicts again).
_MAX_CACHED = 4096
_NO_SPAN = Context()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


def _skip(amount: float, attributes: Attrs, trace_id: int, span_id: int) -> None:
    """Stands in for an instrument the semconv mode does not have."""


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    """Store ``value`` (built on a cache miss); a full cache starts over."""
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value
    return value


def _effect_attrs(effect: Effect, job: JobState) -> dict[str, str | int]:
    return {
        "effect.system": effect.system,
        "effect.operation": effect.operation,
        # The span name is ``<system>.<operation> <target>``: the target is
        # what an unpacked effect view still knows.
        "effect.target": job.name.partition(" ")[2],
    }


def _span_context(trace_id: int, span_id: int) -> Context:
    """A context whose current span is the (sampled) span ``span_id`` of ``trace_id``."""
    if not span_id:
        return _NO_SPAN
    return set_span_in_context(NonRecordingSpan(SpanContext(trace_id, span_id, False, _SAMPLED)))


def _sdk_measure(bound: Callable[[float, Attrs, Context], None]) -> Measure:
    """An SDK instrument's ``record``/``add``/``set`` as a :data:`Measure`."""

    def measure(value: float, attributes: Attrs, trace_id: int, span_id: int) -> None:
        bound(value, attributes, _span_context(trace_id, span_id))

    return measure


class _Instruments:
    """Makes :data:`Measure` functions on an SDK ``MeterProvider`` or an
    :class:`~zerver.trace._aggregate.Aggregator` (zerver's own, for high rates)."""

    def __init__(self, target: MeterProvider | Aggregator) -> None:
        self._agg: Aggregator | None = None
        self._meter = None
        if isinstance(target, Aggregator):
            self._agg = target
        else:
            self._meter = target.get_meter("zerver", __version__)

    def histogram(self, name: str, description: str, buckets: Sequence[float]) -> Measure:
        unit = INSTRUMENTS[name][0]
        if self._agg is not None:
            return self._agg.histogram(name, unit, description, buckets).record
        assert self._meter is not None
        return _sdk_measure(
            self._meter.create_histogram(
                name, unit, description, explicit_bucket_boundaries_advisory=buckets
            ).record
        )

    def counter(self, name: str, description: str) -> Measure:
        unit = INSTRUMENTS[name][0]
        if self._agg is not None:
            return self._agg.counter(name, unit, description).add
        assert self._meter is not None
        return _sdk_measure(self._meter.create_counter(name, unit, description).add)

    def up_down_counter(self, name: str, description: str) -> Measure:
        unit = INSTRUMENTS[name][0]
        if self._agg is not None:
            return self._agg.up_down_counter(name, unit, description).add
        assert self._meter is not None
        return _sdk_measure(self._meter.create_up_down_counter(name, unit, description).add)

    def gauge(self, name: str, description: str) -> Measure:
        unit = INSTRUMENTS[name][0]
        if self._agg is not None:
            return self._agg.gauge(name, unit, description).set
        assert self._meter is not None
        return _sdk_measure(self._meter.create_gauge(name, unit, description).set)


def _job_span_id(rec: RequestRecord, job: JobState) -> int:
    """The id of the span a job's measurements belong to (0: none known)."""
    if job.kind != "effect" and job.cont_step_index is not None:
        steps = rec.steps
        if 0 <= job.cont_step_index < len(steps):
            return steps[job.cont_step_index].span_id
    return job.span_id


class RecordMetrics:
    """Records the metrics of finished request records on ``meter_provider``'s instruments.

    ``semconv_mode`` (``old``, ``new`` or ``dup``, as ``ZER_VER_SEMCONV``) chooses the
    HTTP instruments: ``http.server.request.duration`` (s) and the
    ``http.server.*.body.size`` histograms with the stable attribute names in
    ``new``; ``http.server.duration`` (ms) and ``http.server.request.size`` /
    ``response.size`` with the old names in ``old``; both sets, each with its
    own names, in ``dup``. The ``zerver.*`` instruments are the same in every mode.

    Example::

        metrics = RecordMetrics(provider, "new")
        app.subscribe(metrics)            # or, in the exporter process:
        metrics.record(unpack_record(t))  # once per finished record
    """

    __slots__ = (
        "_active",
        "_active_last",
        "_attrs",
        "_cache_hits",
        "_cache_misses",
        "_depth",
        "_dispatch",
        "_effect",
        "_http_attrs",
        "_old_duration",
        "_old_request_size",
        "_old_response_size",
        "_park_wait",
        "_queue_wait",
        "_request_duration",
        "_request_size",
        "_response_size",
        "_retries",
        "_run_active",
        "_step",
        "mode",
    )

    def __init__(
        self, meter_provider: MeterProvider | Aggregator, semconv_mode: str = "dup"
    ) -> None:
        if semconv_mode not in _MODES:
            raise ValueError(f"semconv mode must be one of {_MODES}, got {semconv_mode!r}")
        self.mode = semconv_mode
        make = _Instruments(meter_provider)

        def histogram(name: str, description: str, buckets: Sequence[float]) -> Measure:
            """The instrument's measure function; _skip where the mode has none."""
            if semconv_mode not in INSTRUMENTS[name][2]:
                return _skip
            return make.histogram(name, description, buckets)

        self._request_duration = histogram(
            "http.server.request.duration",
            "Duration of HTTP server requests.",
            HTTP_DURATION_BUCKETS,
        )
        self._request_size = histogram(
            "http.server.request.body.size",
            "Size of HTTP server request bodies.",
            BODY_SIZE_BUCKETS,
        )
        self._response_size = histogram(
            "http.server.response.body.size",
            "Size of HTTP server response bodies.",
            BODY_SIZE_BUCKETS,
        )
        self._old_duration = histogram(
            "http.server.duration",
            "Duration of HTTP server requests (old conventions).",
            HTTP_DURATION_BUCKETS_MS,
        )
        self._old_request_size = histogram(
            "http.server.request.size",
            "Size of HTTP server request bodies (old conventions).",
            BODY_SIZE_BUCKETS,
        )
        self._old_response_size = histogram(
            "http.server.response.size",
            "Size of HTTP server response bodies (old conventions).",
            BODY_SIZE_BUCKETS,
        )
        self._active = make.up_down_counter(
            "http.server.active_requests", "Number of HTTP server requests in flight."
        )
        self._step = histogram("zerver.step.duration", "Duration of one step run.", PHASE_BUCKETS)
        self._effect = histogram(
            "zerver.effect.duration",
            "Duration of an effect, from enqueue to its end, retries included.",
            PHASE_BUCKETS,
        )
        self._queue_wait = histogram(
            "zerver.job.queue_wait", "Time a job waited in its queue.", PHASE_BUCKETS
        )
        self._dispatch = histogram(
            "zerver.job.dispatch", "Time from a job's take to its start.", PHASE_BUCKETS
        )
        self._park_wait = histogram(
            "zerver.job.park_wait", "Duration of one park episode of a job.", PHASE_BUCKETS
        )
        self._run_active = histogram(
            "zerver.job.run_active", "Time a job worked: started to end, parks excluded.",
            PHASE_BUCKETS,
        )  # fmt: skip
        self._retries = make.counter("zerver.job.retries", "Retries of failed job attempts.")
        self._depth = make.gauge("zerver.job.depth", "Queue depth seen by the last job enqueued.")
        self._cache_hits = make.counter("zerver.cache.hits", "Cache reads that found their key.")
        self._cache_misses = make.counter(
            "zerver.cache.misses", "Cache reads that did not find their key."
        )
        self._attrs: dict[tuple[object, ...], Attrs] = {}
        self._http_attrs: dict[tuple[object, ...], tuple[Attrs, Attrs]] = {}
        self._active_last: dict[tuple[str, str], int] = {}

    # -- active requests (the server calls these; finished records cannot) --------

    def _active_attrs(self, method: str, scheme: str) -> Attrs:
        key = ("active", method, scheme)
        attrs = self._attrs.get(key)
        if attrs is None:
            m = method if method in KNOWN_METHODS else "_OTHER"
            out: dict[str, str | int] = {}
            if self.mode != "old":
                out["http.request.method"] = m
                out["url.scheme"] = scheme
            if self.mode != "new":
                out["http.method"] = m
                out["http.scheme"] = scheme
            attrs = _remember(self._attrs, key, out)
        return attrs

    def request_started(self, method: str, scheme: str = "http") -> None:
        """One more request in flight (``http.server.active_requests`` +1)."""
        self._active(1, self._active_attrs(method, scheme), 0, 0)

    def set_active(self, active: Mapping[tuple[str, str], int]) -> None:
        """Requests in flight now, by (method, scheme), as counted where they run
        (``App.active_requests``): the up-down counter moves by what changed since
        the last call."""
        last = self._active_last
        for key in set(last) | set(active):
            change = active.get(key, 0) - last.get(key, 0)
            if change or key not in last:  # a series from the first sight, at 0 too
                self._active(change, self._active_attrs(*key), 0, 0)
        self._active_last = dict(active)

    def request_ended(self, method: str, scheme: str = "http") -> None:
        """One request fewer in flight; call once for each :meth:`request_started`."""
        self._active(-1, self._active_attrs(method, scheme), 0, 0)

    # -- finished records --------------------------------------------------------------

    def on_request_end(self, record: RequestRecord) -> None:
        """:class:`~zerver.trace.Subscriber` entry point: :meth:`record`."""
        self.record(record)

    def record(self, rec: RequestRecord) -> None:
        """Record every measurement ``rec`` (a finished request record) gives."""
        trace_id = rec.trace_id
        sampled = bool(rec.trace_flags & 0x01) and trace_id != 0
        # Span ids only for a sampled request: only those may become exemplars.
        root = rec.span_id if sampled else 0
        end = rec.end_ts if rec.end_ts is not None else rec.start_ts
        if rec.kind == "http":
            self._http(rec, end - rec.start_ts, trace_id, root)
        route = rec.route
        for sr in rec.steps:
            step_end = sr.end_ts if sr.end_ts is not None else end
            key = ("step", route, sr.name, sr.layer, sr.decision)
            attrs = self._attrs.get(key)
            if attrs is None:
                out: dict[str, str | int] = {
                    "zerver.step.name": sr.name,
                    "zerver.step.layer": sr.layer,
                    "zerver.step.decision": sr.decision or "Error",
                }
                if route is not None:
                    out["http.route"] = route
                attrs = _remember(self._attrs, key, out)
            span = (sr.span_id or root) if sampled else 0
            self._step((step_end - sr.start_ts) / 1e9, attrs, trace_id, span)
        for job in rec.jobs:
            span = (_job_span_id(rec, job) or root) if sampled else 0
            self._job(job, trace_id, span)

    def _http(self, rec: RequestRecord, duration_ns: int, trace_id: int, span: int) -> None:
        status = rec.status
        error: str | None = None
        if rec.system_fault or status >= 500:
            error = rec.error_type or str(status)
        key = ("http", rec.method, rec.route, status, rec.scheme, rec.protocol_version, error)
        pair = self._http_attrs.get(key)
        if pair is None:
            pair = _remember(self._http_attrs, key, self._http_attr_sets(rec, error))
        new, old = pair
        self._request_duration(duration_ns / 1e9, new, trace_id, span)
        self._request_size(rec.request_body_size, new, trace_id, span)
        self._response_size(rec.response_body_size, new, trace_id, span)
        self._old_duration(duration_ns / 1e6, old, trace_id, span)
        self._old_request_size(rec.request_body_size, old, trace_id, span)
        self._old_response_size(rec.response_body_size, old, trace_id, span)

    @staticmethod
    def _http_attr_sets(rec: RequestRecord, error: str | None) -> tuple[Attrs, Attrs]:
        """The stable and the old attribute sets of the HTTP server instruments."""
        method = rec.method if rec.method in KNOWN_METHODS else "_OTHER"
        new: dict[str, str | int] = {
            "http.request.method": method,
            "url.scheme": rec.scheme,
            "network.protocol.version": rec.protocol_version,
        }
        old: dict[str, str | int] = {
            "http.method": method,
            "http.scheme": rec.scheme,
            "http.flavor": rec.protocol_version,
        }
        if rec.route is not None:
            new["http.route"] = old["http.route"] = rec.route
        if rec.status:
            new["http.response.status_code"] = old["http.status_code"] = rec.status
        if error is not None:
            new["error.type"] = error
        return new, old

    def _job(self, job: JobState, trace_id: int, span: int) -> None:
        # Attribute sets are never empty: ``get(key) or _remember(...)`` builds one on a miss.
        cache = self._attrs
        enqueue, take, start, end = job.enqueue_ts, job.take_ts, job.start_ts, job.end_ts
        queue = job.queue
        key: tuple[object, ...] = ("job", queue, job.kind)
        attrs = cache.get(key) or _remember(cache, key, {"job.queue": queue, "job.kind": job.kind})
        if enqueue is not None and take is not None:
            self._queue_wait((take - enqueue) / 1e9, attrs, trace_id, span)
        if take is not None and start is not None:
            self._dispatch((start - take) / 1e9, attrs, trace_id, span)
        parked = 0
        for ep in job.park_episodes:
            resume = ep.resume_ts
            if resume is None:
                continue
            parked += resume - ep.park_ts
            key = ("park", queue, ep.cause)
            pattrs = cache.get(key) or _remember(
                cache, key, {"job.queue": queue, "job.park.cause": ep.cause}
            )
            self._park_wait((resume - ep.park_ts) / 1e9, pattrs, trace_id, span)
        if start is not None and end is not None:
            self._run_active(max(0, end - start - parked) / 1e9, attrs, trace_id, span)
        if job.depth_enqueue is not None:
            key = ("queue", queue)
            qattrs = cache.get(key) or _remember(cache, key, {"job.queue": queue})
            self._depth(job.depth_enqueue, qattrs, trace_id, span)
        if job.retries:
            key = ("retry", queue, job.name)
            rattrs = cache.get(key) or _remember(
                cache, key, {"job.queue": queue, "job.name": job.name}
            )
            self._retries(len(job.retries), rattrs, trace_id, span)
        effect = job.effect
        if effect is None:
            return
        outcome = job.outcome or "unfinished"
        key = ("effect", job.name, outcome)
        eattrs = cache.get(key) or _remember(
            cache, key, {**_effect_attrs(effect, job), "effect.outcome": outcome}
        )
        if enqueue is not None and end is not None:
            self._effect((end - enqueue) / 1e9, eattrs, trace_id, span)
        hit = job.result_meta.get("cache.hit") if job.result_meta else None
        if hit is not None:
            key = ("cache", job.name)
            cattrs = cache.get(key) or _remember(cache, key, _effect_attrs(effect, job))
            (self._cache_hits if hit else self._cache_misses)(1, cattrs, trace_id, span)
