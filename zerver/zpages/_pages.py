"""The trace pages and their JSON API, served by the app itself under ``ZER_VER_ZPAGES_PATH``.

Routes (``{p}`` is the prefix, ``/debug`` by default)::

    GET {p}/tracez                      summary; ?name=&kind=&bucket= adds a sample list
    GET {p}/traces/{trace_id}           one request's waterfall
    GET {p}/pipeline                    the export pipeline's counters
    GET {p}/tracez/api/summary          JSON behind the summary
    GET {p}/tracez/api/samples?name=&kind=latency|error|running&bucket=0-8
    GET {p}/tracez/api/traces/{trace_id}
    GET {p}/tracez/api/pipeline
    GET {p}/tracez/static/{zpages.css,zpages.js}

Only the page data is computed here (from the aggregator's records, the span
tree built by a trace engine when asked); the HTML is rendered from the same
dicts the API returns, every value through :func:`html.escape`, and the
script fills panels with ``textContent`` only. A client the allow-list does not
admit is not claimed: the app answers it as it would without the pages.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from html import escape
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

import orjson

from zerver.core._http import Request, Response
from zerver.export._spans import KIND_NAMES, STATUS_NAMES, SpanData
from zerver.trace._records import JobState, RequestRecord

from ._access import Allow
from ._aggregator import BUCKET_LABELS, Sample, TracezAggregator

if TYPE_CHECKING:
    from zerver._config import Settings
    from zerver._specs import SamplerSpec
    from zerver.export._spans import Resource
    from zerver.runtime._runtime import Runtime
    from zerver.trace._tracing import TraceEngine

__all__ = ["ZPages"]

_SAMPLE_KINDS = ("latency", "error", "running")
_STATIC = {"zpages.css": "text/css; charset=utf-8", "zpages.js": "text/javascript; charset=utf-8"}
_PER_PROCESS = (
    "Numbers are this process's own. With --workers N each worker process counts only "
    "the requests it served, and a reload may be answered by another worker."
)
# Pages carry no inline script and fetch nothing from elsewhere; bars are placed with
# inline style attributes, hence 'unsafe-inline' for styles only.
_HEADERS_COMMON = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'",
    ),
]


class _NoSink:
    """Spans built for a page go nowhere else."""

    def export(self, spans: list[SpanData]) -> None:
        return None


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _json_value(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _iso(wall_ns: int) -> str:
    secs, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1000:06d}Z"


def _process() -> dict[str, object]:
    return {"pid": os.getpid(), "note": _PER_PROCESS}


class ZPages:
    """The trace pages of one app: an aggregator subscribed to it, and the routes."""

    def __init__(
        self, settings: Settings, runtime: Runtime, resource: Callable[[], Resource]
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self._resource = resource
        self.prefix = settings.zpages_path
        self.allow = Allow.parse(settings.zpages_allow)
        self.aggregator = TracezAggregator()
        runtime.subscribe(self.aggregator)
        self._engine: TraceEngine | None = None
        p = self.prefix
        self._exact: dict[str, Callable[[Request], Response]] = {
            p + "/tracez": self._tracez_page,
            p + "/pipeline": self._pipeline_page,
            p + "/tracez/api/summary": self._summary_api,
            p + "/tracez/api/samples": self._samples_api,
            p + "/tracez/api/pipeline": self._pipeline_api,
        }
        self._under: tuple[tuple[str, Callable[[Request, str], Response]], ...] = (
            (p + "/traces/", self._trace_page),
            (p + "/tracez/api/traces/", self._trace_api),
            (p + "/tracez/static/", self._static),
        )

    # -- routing ----------------------------------------------------------------------

    def claims(self, request: Request) -> bool:
        """Whether this request is for a page and its client may see the pages."""
        path = request.path
        if not path.startswith(self.prefix):
            return False
        if path not in self._exact and not any(path.startswith(u) for u, _ in self._under):
            return False
        return self.allow(request.client[0] if request.client is not None else None)

    def serve(self, request: Request) -> Response:
        """Answer a claimed request (``GET`` or ``HEAD``; others get 405)."""
        if request.method not in ("GET", "HEAD"):
            return self._json({"error": "method not allowed"}, 405, [("allow", "GET, HEAD")])
        path = request.path
        page = self._exact.get(path)
        if page is not None:
            return page(request)
        for under, handler in self._under:
            if path.startswith(under):
                return handler(request, path[len(under) :])
        return self._json({"error": "not found"}, 404)

    # -- data (what the API returns and the pages render) ------------------------------

    def summary(self) -> dict[str, Any]:
        agg = self.aggregator
        rows = agg.summary()
        return {
            "process": _process(),
            "buckets": list(BUCKET_LABELS),
            "requests": agg.requests,
            "running": agg.running,
            "evicted": dict(agg.evicted),
            "spans": [
                {"name": r.name, "running": r.running, "errors": r.errors, "latency": r.latency}
                for r in rows
            ],
        }

    def samples(self, name: str, kind: str, bucket: int | None) -> dict[str, Any]:
        found = self.aggregator.samples(name, kind, bucket)
        sampling = self.sampling()
        return {
            "process": _process(),
            "name": name,
            "kind": kind,
            "bucket": bucket,
            "bucket_label": BUCKET_LABELS[bucket]
            if kind == "latency" and bucket is not None and 0 <= bucket < len(BUCKET_LABELS)
            else None,
            "sampling": sampling.describe(),
            "samples": [self._sample(s, sampling) for s in found],
        }

    def sampling(self) -> _Sampling:
        """What this process knows of the sampling decisions (docs/sampling.md)."""
        from zerver._specs import SamplerSpec
        from zerver.trace._offload import ProcessTraceSubscriber
        from zerver.trace._tracing import TraceEngine

        tail_here = tail_elsewhere = False
        for sub in self.runtime.subscribers:
            if isinstance(sub, TraceEngine) and sub.sampler is not None:
                tail_here = True
            elif isinstance(sub, ProcessTraceSubscriber):
                tail_elsewhere = True
        spec = self.settings.sampler_spec
        return _Sampling(spec, spec != SamplerSpec(), tail_here, tail_elsewhere)

    @staticmethod
    def _sample(s: Sample, sampling: _Sampling) -> dict[str, Any]:
        rec = s.record
        start_ts = rec.start_ts
        if s.job_index is not None:
            enq = rec.jobs[s.job_index].enqueue_ts
            start_ts = enq if enq is not None else start_ts
        return {
            "start": _iso(rec.start_wall_ns + (start_ts - rec.start_ts)),
            "duration_ms": _ms(s.duration_ns),
            "status": rec.status,
            "error": s.error,
            "trace_id": f"{rec.trace_id:032x}",
            "span": "root" if s.job_index is None else f"job {s.job_index}",
            "route": rec.route,
            "path": rec.path,
            "sampled": bool(rec.trace_flags & 0x01),
            **sampling.of(rec),
        }

    def trace(self, trace_id: int) -> dict[str, Any] | None:
        rec = self.aggregator.find_trace(trace_id)
        if rec is None:
            return None
        spans = self._build(rec)
        root = spans[0]
        by_id = {s.span_id: s for s in spans}
        children: dict[int, list[SpanData]] = {}
        for s in spans[1:]:
            parent = s.parent_span_id if s.parent_span_id in by_id else root.span_id
            children.setdefault(parent, []).append(s)
        origin = spans[0].start_ns
        segments = _segments(rec)
        out: list[dict[str, Any]] = []
        stack: list[tuple[SpanData, int]] = [(root, 0)]
        while stack:
            span, depth = stack.pop()
            out.append(
                {
                    "span_id": f"{span.span_id:016x}",
                    "parent_span_id": f"{span.parent_span_id:016x}"
                    if span.parent_span_id
                    else None,
                    "name": span.name,
                    "kind": KIND_NAMES.get(span.kind, str(span.kind)),
                    "depth": depth,
                    "start_ms": _ms(span.start_ns - origin),
                    "duration_ms": _ms(span.end_ns - span.start_ns),
                    "status": {
                        "code": STATUS_NAMES.get(span.status_code, str(span.status_code)),
                        "message": span.status_message,
                    },
                    "attributes": {k: _json_value(v) for k, v in span.attributes.items()},
                    "events": [
                        {"name": n, "time_ms": _ms(t - origin), "attributes": dict(a)}
                        for n, t, a, _dropped in span.events
                    ],
                    "segments": segments.get(span.span_id, []),
                }
            )
            kids = sorted(children.get(span.span_id, []), key=lambda c: c.start_ns, reverse=True)
            stack.extend((k, depth + 1) for k in kids)
        return {
            "process": _process(),
            "trace_id": f"{trace_id:032x}",
            "name": root.name,
            "start": _iso(root.start_ns),
            "duration_ms": _ms(root.end_ns - root.start_ns),
            "sampled": bool(rec.trace_flags & 0x01),
            "spans": out,
        }

    def pipeline(self) -> dict[str, Any]:
        """What this process can see of trace export."""
        from zerver.export._sinks import PipelineSink
        from zerver.trace._offload import ProcessTraceSubscriber
        from zerver.trace._tracing import TraceEngine

        found: list[dict[str, Any]] = []
        for sub in self.runtime.subscribers:
            if isinstance(sub, TraceEngine) and isinstance(sub.sink, PipelineSink):
                found.append(
                    {
                        "where": "this process",
                        "traces_built": sub.built,
                        "unsampled": sub.unsampled,
                        "export": asdict(sub.sink.pipeline.stats()),
                    }
                )
            elif isinstance(sub, ProcessTraceSubscriber):
                stats = sub.stats()
                found.append(
                    {
                        "where": "exporter process",
                        "note": "Spans are built and exported in a separate exporter "
                        "process; these are the records this process handed over and "
                        "the exporter's counters as it last reported them.",
                        **stats,
                    }
                )
        return {
            "process": _process(),
            "exporting": bool(found),
            "note": None
            if found
            else "Trace export is off in this process (OTEL_TRACES_EXPORTER=none or no "
            "exporter configured); tracez still shows every request.",
            "pipelines": found,
        }

    def _build(self, rec: RequestRecord) -> list[SpanData]:
        engine = self._engine
        if engine is None:
            from zerver.trace._tracing import engine_from_settings

            engine = self._engine = engine_from_settings(
                self.settings,
                _NoSink(),
                resource=self._resource(),
                interpreters=self.runtime.interpreters,
            )
        # Promoted spans take fresh ids from the record's id source: give the build its
        # own (the same on every view) so the app's stays untouched.
        reason = self.sampling().of(rec)["sampling_reason"]
        ids = rec.ids
        rec.ids = random.Random(rec.trace_id)
        try:
            return engine.build(rec, reason)
        finally:
            rec.ids = ids

    # -- handlers -----------------------------------------------------------------------

    @staticmethod
    def _json(
        data: Mapping[str, Any], status: int = 200, extra: list[tuple[str, str]] | None = None
    ) -> Response:
        return Response(
            status,
            orjson.dumps(data),
            [("content-type", "application/json"), *_HEADERS_COMMON, *(extra or [])],
        )

    @staticmethod
    def _html(body: str, status: int = 200) -> Response:
        return Response(
            status, body.encode(), [("content-type", "text/html; charset=utf-8"), *_HEADERS_COMMON]
        )

    @staticmethod
    def _query(request: Request) -> tuple[str, str, int | None]:
        q = parse_qs(request.query, keep_blank_values=True)
        name = q.get("name", [""])[0]
        kind = q.get("kind", [""])[0]
        bucket_text = q.get("bucket", [""])[0]
        bucket = int(bucket_text) if bucket_text.isdigit() and len(bucket_text) < 3 else None
        return name, kind, bucket

    def _summary_api(self, request: Request) -> Response:
        return self._json(self.summary())

    def _samples_api(self, request: Request) -> Response:
        name, kind, bucket = self._query(request)
        if kind not in _SAMPLE_KINDS or (kind == "latency" and bucket is None):
            return self._json(
                {
                    "error": "accepted: name=<span name>&kind=latency&bucket=0-8, kind=error or "
                    "kind=running"
                },
                400,
            )
        return self._json(self.samples(name, kind, bucket))

    def _trace_api(self, request: Request, rest: str) -> Response:
        trace_id = _trace_id(rest)
        data = self.trace(trace_id) if trace_id is not None else None
        if data is None:
            return self._json({"error": "trace not among the kept samples"}, 404)
        return self._json(data)

    def _pipeline_api(self, request: Request) -> Response:
        return self._json(self.pipeline())

    def _static(self, request: Request, name: str) -> Response:
        ctype = _STATIC.get(name)
        if ctype is None:
            return self._json({"error": "not found"}, 404)
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return Response(200, body, [("content-type", ctype), *_HEADERS_COMMON])

    def _tracez_page(self, request: Request) -> Response:
        data = self.summary()
        name, kind, bucket = self._query(request)
        parts = [_summary_html(self.prefix, data)]
        if kind in _SAMPLE_KINDS and name:
            parts.append(_samples_html(self.prefix, self.samples(name, kind, bucket)))
        return self._html(_layout(self.prefix, "tracez", "".join(parts)))

    def _trace_page(self, request: Request, rest: str) -> Response:
        trace_id = _trace_id(rest)
        data = self.trace(trace_id) if trace_id is not None else None
        if data is None:
            body = (
                f"<h1>Trace {escape(rest)}</h1><p class=note>Not among the samples this "
                "process keeps (it may have been served by another process, evicted, or "
                "still be running).</p>"
            )
            return self._html(_layout(self.prefix, "trace", body), 404)
        return self._html(_layout(self.prefix, "trace", _waterfall_html(self.prefix, data)))

    def _pipeline_page(self, request: Request) -> Response:
        return self._html(_layout(self.prefix, "pipeline", _pipeline_html(self.pipeline())))


class _Sampling:
    """What the serving process knows of a request's sampling decision.

    The head decision is made here at request start (the record's sampled flag).
    The tail decision is made where traces are built: in this process, whose
    sampler leaves its reason on the record, or in the exporter process, whose
    decision never comes back. So a request the head did not sample has a known
    fate only when its tail was decided here, or when no tail trigger is set
    (the head decision is then final).

    ``of(record)`` answers ``sampling_reason`` (the ``zerver.sampling.reason`` the
    exported root span carries, when known here) and ``sampling_decision``:

    ==============  ==============================================================
    ``kept``        exported; ``sampling_reason`` says why (``head``, ``tail:...``)
    ``dropped``     neither head nor tail kept it: no trace was exported
    ``pending``     running, not head-sampled: the tail decides when it ends
    ``elsewhere``   not head-sampled; the exporter process's tail sampler decided
                    (exported with ``tail:<trigger>``, or dropped): not known here
    ``no_sampler``  no sampler configured: the sampled flag alone decided, and
                    exported traces carry no reason
    ==============  ==============================================================
    """

    __slots__ = ("configured", "spec", "tail_elsewhere", "tail_here")

    def __init__(
        self, spec: SamplerSpec, configured: bool, tail_here: bool, tail_elsewhere: bool
    ) -> None:
        self.spec = spec
        self.configured = configured  # anything but the default (head:1, no reason)
        self.tail_here = tail_here
        # Only records the head did not sample, with triggers that may keep them.
        self.tail_elsewhere = tail_elsewhere and not tail_here and bool(spec.tail)

    def of(self, rec: RequestRecord) -> dict[str, str | None]:
        if not self.configured:
            return {"sampling_reason": None, "sampling_decision": "no_sampler"}
        if rec.sampling_reason is not None:
            return {"sampling_reason": rec.sampling_reason, "sampling_decision": "kept"}
        head = bool(rec.trace_flags & 0x01)
        if rec.end_ts is None:  # running: only the head has decided
            if head:
                return {"sampling_reason": "head", "sampling_decision": "kept"}
            pending = bool(self.spec.tail) and (self.tail_here or self.tail_elsewhere)
            return {
                "sampling_reason": None,
                "sampling_decision": "pending" if pending else "dropped",
            }
        if self.tail_here:  # the sampler here decided, and kept nothing
            return {"sampling_reason": None, "sampling_decision": "dropped"}
        if head:
            return {"sampling_reason": "head", "sampling_decision": "kept"}
        if self.tail_elsewhere:
            return {"sampling_reason": None, "sampling_decision": "elsewhere"}
        return {"sampling_reason": None, "sampling_decision": "dropped"}

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        if not self.configured:
            return {
                "sampler": None,
                "tail_decided_in": None,
                "note": "No sampler is configured: every trace the caller did not refuse is "
                "sampled, and exported traces carry no zerver.sampling.reason.",
            }
        sampler = {
            "head_ratio": spec.head_ratio,
            "parent_based": spec.parent_based,
            "tail": list(spec.tail),
        }
        if self.tail_here:
            where: str | None = "this process"
            note = (
                "Head decided at request start, tail at request end, both in this process: "
                "the reason shown is the exported root span's zerver.sampling.reason."
            )
        elif self.tail_elsewhere:
            where = "exporter process"
            note = (
                "Head decided here at request start; the tail is decided in the exporter "
                "process, and its decision is not known here. A request the head did not "
                "sample shows 'elsewhere': it was exported with zerver.sampling.reason "
                "tail:<trigger> if a trigger matched, else dropped."
            )
        else:
            where = None
            note = (
                "Head decided here at request start; no tail sampler runs "
                + ("(no tail triggers), " if not spec.tail else "(trace export is off), ")
                + "so that decision is final."
            )
        return {"sampler": sampler, "tail_decided_in": where, "note": note}


def _trace_id(text: str) -> int | None:
    text = text.strip().lower()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        return None
    return int(text, 16) or None


def _segments(rec: RequestRecord) -> dict[int, list[dict[str, Any]]]:
    """Each job span's phases: queue wait, dispatch, park by cause, run."""
    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    cont_span = {
        sr.job_index: sr.span_id
        for sr in rec.steps
        if sr.layer == "continuation" and sr.job_index is not None
    }
    out: dict[int, list[dict[str, Any]]] = {}
    for job in rec.jobs:
        span_id = job.span_id if job.kind == "effect" else cont_span.get(job.index, job.span_id)
        if span_id:
            out[span_id] = _job_segments(job, rec.start_ts, end)
    return out


def _job_segments(job: JobState, origin: int, end: int) -> list[dict[str, Any]]:
    segs: list[dict[str, Any]] = []

    def add(phase: str, a: int | None, b: int | None) -> None:
        if a is not None and b is not None and b > a:
            segs.append({"phase": phase, "start_ms": _ms(a - origin), "end_ms": _ms(b - origin)})

    stop = job.end_ts if job.end_ts is not None else end
    add("queue_wait", job.enqueue_ts, job.take_ts if job.take_ts is not None else stop)
    add("dispatch", job.take_ts, job.start_ts if job.start_ts is not None else stop)
    if job.start_ts is not None:
        at = job.start_ts
        for ep in sorted(job.park_episodes, key=lambda e: e.park_ts):
            add("run", at, ep.park_ts)
            resume = ep.resume_ts if ep.resume_ts is not None else stop
            add(f"park({ep.cause})", ep.park_ts, resume)
            at = max(at, resume)
        add("run", at, stop)
    return segs


# -- HTML -------------------------------------------------------------------------------


def _layout(prefix: str, page: str, body: str) -> str:
    p = escape(prefix)
    nav = " ".join(
        f'<a href="{p}/{target}"{" class=here" if page == key else ""}>{label}</a>'
        for key, target, label in (
            ("tracez", "tracez", "tracez"),
            ("pipeline", "pipeline", "pipeline"),
        )
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>zerver {escape(page)}</title>"
        # No icon request: it would reach the app and be counted as one of its 404s.
        '<link rel=icon href="data:,">'
        f'<link rel=stylesheet href="{p}/tracez/static/zpages.css">'
        f'<script src="{p}/tracez/static/zpages.js" defer></script>'
        f'</head><body data-prefix="{p}"><nav><b>zerver</b> {nav}</nav><main>{body}</main>'
        f"<footer>Answered by process {os.getpid()}. {escape(_PER_PROCESS)}</footer>"
        "</body></html>"
    )


def _samples_link(prefix: str, name: str, kind: str, bucket: int | None, text: str) -> str:
    href = f"{prefix}/tracez?name={quote(name, safe='')}&kind={kind}"
    if bucket is not None:
        href += f"&bucket={bucket}"
    return f'<a href="{escape(href)}">{escape(text)}</a>'


def _summary_html(prefix: str, data: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{escape(label)}</th>" for label in data["buckets"])
    rows = []
    for span in data["spans"]:
        name = span["name"]

        def cell(n: int, kind: str, bucket: int | None = None, *, _name: str = name) -> str:
            if not n:
                return "<td class=zero>0</td>"
            return f"<td>{_samples_link(prefix, _name, kind, bucket, str(n))}</td>"

        buckets = "".join(cell(n, "latency", i) for i, n in enumerate(span["latency"]))
        rows.append(
            f"<tr><th class=name>{escape(name)}</th>{cell(span['running'], 'running')}"
            f"{cell(span['errors'], 'error')}{buckets}</tr>"
        )
    evicted = ", ".join(f"{escape(k)} {v}" for k, v in data["evicted"].items())
    return (
        "<h1>tracez</h1>"
        f"<p class=note>{data['requests']} requests counted, {data['running']} running. "
        f"Evicted by the bounds: {evicted}.</p>"
        "<table id=summary><thead><tr><th>Span name</th><th>Running</th><th>Errors</th>"
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _samples_html(prefix: str, data: Mapping[str, Any]) -> str:
    what = {"latency": f"latency {data['bucket_label']}", "error": "errors", "running": "running"}
    title = f"{data['name']}: {what.get(data['kind'], data['kind'])}"
    rows = []
    for s in data["samples"]:
        tid = escape(s["trace_id"])
        rows.append(
            "<tr>"
            f"<td>{escape(s['start'])}</td><td class=num>{s['duration_ms']:.3f} ms</td>"
            f"<td>{s['status'] or 'running'}{' error' if s['error'] else ''}</td>"
            f'<td><a class=trace href="{escape(prefix)}/traces/{tid}">{tid}</a></td>'
            f"<td>{escape(s['route'] or '-')}</td><td>{escape(s['path'])}</td>"
            f"<td>{'yes' if s['sampled'] else 'no'}</td>"
            f"<td>{escape(_reason_text(s))}</td>"
            "</tr>"
        )
    body = "".join(rows) if rows else "<tr><td colspan=8>No samples kept for this cell.</td></tr>"
    return (
        f"<h2 id=samples-title>{escape(title)}</h2>"
        "<table id=samples><thead><tr><th>Start (UTC)</th><th>Duration</th><th>Status</th>"
        "<th>Trace id</th><th>Route</th><th>Path</th><th>Sampled</th>"
        f"<th>zerver.sampling.reason</th></tr></thead><tbody>{body}</tbody></table>"
        f"<p class=note id=sampling-note>{escape(data['sampling']['note'])}</p>"
    )


_DECISION_TEXT = {
    "dropped": "dropped: no trace exported",
    "pending": "pending: the tail decides when it ends",
    "elsewhere": "not head-sampled; tail decided in the exporter process",
    "no_sampler": "no sampler",
}


def _reason_text(sample: Mapping[str, Any]) -> str:
    """The reason column: the reason when known, else what is known of the decision."""
    reason = sample["sampling_reason"]
    if reason is not None:
        return str(reason)
    decision = str(sample["sampling_decision"])
    return _DECISION_TEXT.get(decision, decision)


def _waterfall_html(prefix: str, data: Mapping[str, Any]) -> str:
    total = max(float(data["duration_ms"]), 1e-6)

    def pct(ms: float) -> str:
        return f"{max(0.0, min(100.0, ms / total * 100)):.3f}%"

    rows = []
    for span in data["spans"]:
        segs = "".join(
            f'<span class="seg {escape(seg["phase"].partition("(")[0])}" '
            f'title="{escape(seg["phase"])} {seg["end_ms"] - seg["start_ms"]:.3f} ms" '
            f'style="{_seg_style(seg, span)}"></span>'
            for seg in span["segments"]
        )
        status = span["status"]["code"]
        rows.append(
            f'<tr class="span {escape(status.lower())}" data-span-id="{escape(span["span_id"])}">'
            f'<td class=label style="padding-left:{0.4 + span["depth"] * 1.2:.1f}em">'
            f"{escape(span['name'])}</td>"
            f'<td class=lane><div class=bar data-name="{escape(span["name"])}" '
            f'style="left:{pct(span["start_ms"])};width:{pct(span["duration_ms"])}">{segs}</div>'
            f"</td><td class=num>{span['duration_ms']:.3f} ms</td></tr>"
        )
    legend = "".join(
        f'<span class="seg {c}"></span> {label} '
        for c, label in (
            ("queue_wait", "queue wait"),
            ("dispatch", "dispatch"),
            ("park", "park (cause in its title)"),
            ("run", "run"),
        )
    )
    api = f"{prefix}/tracez/api/traces/{data['trace_id']}"
    return (
        f"<h1>{escape(data['name'])}</h1>"
        f"<p class=note>trace <code>{escape(data['trace_id'])}</code>, started "
        f"{escape(data['start'])}, {data['duration_ms']:.3f} ms, "
        f"{len(data['spans'])} spans. Click a span for its attributes, events and status.</p>"
        f"<p class=legend>{legend}</p>"
        f'<table id=waterfall data-api="{escape(api)}"><tbody>{"".join(rows)}</tbody></table>'
        "<section id=details hidden><h2 id=details-name></h2><p id=details-status></p>"
        "<h3>Attributes</h3><table id=details-attributes></table>"
        "<h3>Events</h3><table id=details-events></table></section>"
    )


def _seg_style(seg: Mapping[str, Any], span: Mapping[str, Any]) -> str:
    """A segment's place inside its span's bar, in percent of the span."""
    dur = float(span["duration_ms"])
    if dur <= 0:
        return "left:0%;width:0%"
    left = max(0.0, min(100.0, (seg["start_ms"] - span["start_ms"]) / dur * 100))
    width = max(0.0, min(100.0 - left, (seg["end_ms"] - seg["start_ms"]) / dur * 100))
    return f"left:{left:.3f}%;width:{width:.3f}%"


def _pipeline_html(data: Mapping[str, Any]) -> str:
    parts = ["<h1>Export pipeline</h1>"]
    if data["note"]:
        parts.append(f"<p class=note>{escape(data['note'])}</p>")
    for pipe in data["pipelines"]:
        parts.append(f"<h2>Built in {escape(pipe['where'])}</h2>")
        if pipe.get("note"):
            parts.append(f"<p class=note>{escape(pipe['note'])}</p>")
        parts.append(_dict_table({k: v for k, v in pipe.items() if k not in ("where", "note")}))
    return "".join(parts)


def _dict_table(data: Mapping[str, Any]) -> str:
    rows = []
    for key, value in data.items():
        shown = _dict_table(value) if isinstance(value, Mapping) else escape(str(value))
        rows.append(f"<tr><th>{escape(str(key))}</th><td>{shown}</td></tr>")
    return f"<table class=counters>{''.join(rows)}</table>"
