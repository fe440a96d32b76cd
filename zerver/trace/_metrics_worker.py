"""The server's metrics: finished records in, OTLP metrics out, on a thread of their own.

:class:`MetricsWorker` is the thin driver around the sans-I/O pieces: a
:class:`~zerver.RecordMetrics` recording on zerver's own
:class:`~zerver.trace._aggregate.Aggregator`, collected every
``OTEL_METRIC_EXPORT_INTERVAL`` into the SDK's ``MetricsData`` and handed to an
SDK ``MetricExporter`` (:class:`~zerver.export.OtlpMetricExporter`, or the
SDK's console exporter).

Rules:

* :meth:`MetricsWorker.offer` is called where traces are built, after the
  sampling decision (the exporter process's build loop, or the server's
  in-process engine): a ``deque`` append, no lock, never raises. The buffer is
  bounded (``max_pending``); a record that does not fit is dropped, counted
  (``records_dropped``) and logged within seconds by a drop reporter.
* The worker's thread is the only user of the aggregator: it records what was
  offered, collects when the interval is due and exports. A slow or absent
  backend delays the next collection, never the offering side; the points of a
  failed export are counted (``failed``) and, with cumulative temporality, sent
  again in the next collection's totals.
* :meth:`close` records what is buffered, collects and exports once more within
  its timeout, and shuts the exporter down.
* The trace export pipeline's own counters are observed just before each
  collection (:class:`PipelineObserver`), under the OpenTelemetry SDK's
  self-observability names where they exist.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from zerver._version import __version__
from zerver.export._config import ExportConfig, MetricsExportConfig
from zerver.export._log import DropReporter
from zerver.export._metrics_exporter import OtlpMetricExporter, temporality_preference

from ._aggregate import Aggregator
from ._metrics import RecordMetrics

if TYPE_CHECKING:
    from zerver.export._pipeline import ExportStats

__all__ = ["MetricsWorker", "PipelineObserver"]

_log = structlog.get_logger("zerver.export")


#: ``zerver.export.breaker.state``'s values.
BREAKER_STATES = {"disabled": -1, "closed": 0, "half_open": 1, "open": 2}


class PipelineObserver:
    """The trace export pipeline's counters as instruments of ``aggregator``.

    Called before each collection with the pipeline's :class:`ExportStats` (cumulative
    totals and current levels); it adds what changed since the previous call:

    * ``otel.sdk.exporter.span.exported`` ({span}, counter): spans the backend
      accepted (sent or replayed from the spool), and, with ``error.type`` set to
      the drop reason (``queue_full``, ``export_failed``, ``rejected``...), the
      spans dropped; ``otel.component.type`` names the exporter
      (``otlp_http_json_span_exporter`` or ``otlp_http_span_exporter``);
    * ``otel.sdk.processor.span.queue.size`` and ``.queue.capacity`` ({span},
      up-down counters): the pipeline's buffer, as the batching processor's;
    * ``zerver.export.spooled`` ({span}, counter): spans written to the disk spool;
    * ``zerver.export.retries`` ({retry}, counter): export attempts retried;
    * ``zerver.export.breaker.state`` ({state}, gauge): the circuit breaker,
      -1 disabled, 0 closed, 1 half-open, 2 open.
    """

    def __init__(self, aggregator: Aggregator, protocol: str = "http/json") -> None:
        kind = (
            "otlp_http_json_span_exporter" if protocol == "http/json" else "otlp_http_span_exporter"
        )
        self._exporter_attrs = {"otel.component.type": kind, "otel.component.name": f"{kind}/0"}
        self._dropped_attrs: dict[str, dict[str, str]] = {}
        processor = "batching_span_processor"
        self._queue_attrs = {
            "otel.component.type": processor,
            "otel.component.name": f"{processor}/0",
        }
        self._empty: dict[str, str] = {}
        self._exported = aggregator.counter(
            "otel.sdk.exporter.span.exported",
            "{span}",
            "Spans the exporter handled: accepted, or dropped for the reason in error.type.",
        )
        self._queue_size = aggregator.up_down_counter(
            "otel.sdk.processor.span.queue.size", "{span}", "Spans waiting in the export buffer."
        )
        self._queue_capacity = aggregator.up_down_counter(
            "otel.sdk.processor.span.queue.capacity", "{span}", "The export buffer's capacity."
        )
        self._spooled = aggregator.counter(
            "zerver.export.spooled", "{span}", "Spans written to the disk spool."
        )
        self._retries = aggregator.counter(
            "zerver.export.retries", "{retry}", "Export attempts retried."
        )
        self._breaker = aggregator.gauge(
            "zerver.export.breaker.state",
            "{state}",
            "The export circuit breaker: -1 disabled, 0 closed, 1 half-open, 2 open.",
        )
        self._last: dict[str, int] = {}

    def _delta(self, key: str, total: int) -> int:
        """``total`` (a cumulative counter or a level) minus its value at the last call."""
        change = total - self._last.get(key, 0)
        self._last[key] = total
        return change

    def observe(self, stats: ExportStats) -> None:
        exported = self._delta("exported", stats.exported + stats.replayed)
        if exported:
            self._exported.add(exported, self._exporter_attrs)
        for reason, total in stats.dropped.items():
            change = self._delta(f"dropped:{reason}", total)
            if change:
                attrs = self._dropped_attrs.get(reason)
                if attrs is None:
                    attrs = self._dropped_attrs[reason] = {
                        **self._exporter_attrs,
                        "error.type": reason,
                    }
                self._exported.add(change, attrs)
        for key, table, value in (
            ("queue_size", self._queue_size, stats.queue_depth),
            ("queue_capacity", self._queue_capacity, stats.queue_capacity),
        ):
            change = self._delta(key, value)
            if change:
                table.add(change, self._queue_attrs)
        spooled = self._delta("spooled", stats.spooled)
        if spooled:
            self._spooled.add(spooled, self._empty)
        retries = self._delta("retries", stats.retries)
        if retries:
            self._retries.add(retries, self._empty)
        self._breaker.set(BREAKER_STATES.get(stats.breaker_state, -1), self._empty)


class MetricsWorker:
    """Records offered request records' metrics and exports them periodically.

    Example (what the server does when ``OTEL_METRICS_EXPORTER`` is set)::

        worker = MetricsWorker.from_config(MetricsExportConfig.from_env(), resource)
        worker.offer(record)  # for every finished record, sampled or not
        worker.close(5.0)     # at shutdown
    """

    def __init__(
        self,
        aggregator: Aggregator,
        metrics: RecordMetrics,
        exporter: MetricExporter,
        *,
        interval_s: float = 60.0,
        export_timeout_s: float = 30.0,
        max_pending: int = 16_384,
        observe: Callable[[], None] | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.observe = observe
        self.active: Mapping[tuple[str, str], int] | None = None
        """Requests in flight by (method, scheme), read at each collection for
        ``http.server.active_requests``: the app's own count in the server process,
        or the last one the server sent to the exporter process."""
        """Called on the worker's thread before each collection (see :class:`PipelineObserver`)."""
        self.metrics = metrics
        self.exporter = exporter
        self.interval_s = interval_s
        self.export_timeout_s = export_timeout_s
        self.max_pending = max_pending
        self.records = 0
        """Records whose metrics were recorded."""
        self.records_dropped = 0
        """Records dropped because the buffer was full."""
        self.collections = 0
        self.exports_failed = 0
        self.errors = 0
        """Records or collections that raised (a bug; logged)."""
        # deque.append and popleft are atomic under the GIL: no lock for offer().
        self._pending: deque[Any] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._deadline = 0.0
        self._drops = DropReporter("metrics records dropped", self._drop_totals)
        self._thread = threading.Thread(target=self._run, name="zerver-metrics", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(
        cls,
        config: MetricsExportConfig,
        resource: Mapping[str, Any],
        *,
        semconv_mode: str = "dup",
        export: ExportConfig | None = None,
        pipeline_stats: Callable[[], ExportStats] | None = None,
    ) -> MetricsWorker:
        """The worker ``config`` describes (``config.exporter`` is ``otlp`` or ``console``).

        ``resource``: the attributes the process's traces carry (a
        ``service.instance.id`` among them, so each process reports its own
        series); ``export`` lends the traces' breaker, rate limits and TLS files;
        ``pipeline_stats`` (the trace pipeline's ``stats``) adds its counters.
        """
        if config.exporter == "console":
            exporter: MetricExporter = ConsoleMetricExporter(
                preferred_temporality=temporality_preference(config.temporality)
            )
        elif config.exporter == "otlp":
            exporter = OtlpMetricExporter.from_config(config, export)
        else:
            raise ValueError(f"no metrics worker for exporter {config.exporter!r}")
        aggregator = Aggregator(
            resource=Resource(dict(resource)),
            scope=InstrumentationScope("zerver", __version__),
            temporality=config.temporality,
        )
        observe = None
        if pipeline_stats is not None:
            observer = PipelineObserver(
                aggregator, export.protocol if export is not None else "http/json"
            )
            stats = pipeline_stats

            def observe() -> None:
                observer.observe(stats())

        return cls(
            aggregator,
            RecordMetrics(aggregator, semconv_mode),
            exporter,
            interval_s=config.interval_s,
            export_timeout_s=config.export_timeout_s,
            observe=observe,
        )

    # -- any thread ---------------------------------------------------------------------

    def offer(self, record: Any) -> None:
        """Queue a finished record (after its sampling decision) for its metrics."""
        pending = self._pending
        if len(pending) >= self.max_pending or self._closed:
            self.records_dropped += 1
            self._drops.poke()
            return
        pending.append(record)

    def on_request_end(self, record: Any) -> None:
        """:class:`~zerver.trace.Subscriber` entry point (in-process tracing): :meth:`offer`."""
        self.offer(record)

    def shutdown(self) -> None:
        """:class:`~zerver.trace.Subscriber` exit: :meth:`close` within the export timeout."""
        self.close(min(self.export_timeout_s, 5.0))

    def abandon(self) -> None:
        """Stop at once (a second signal): what was not exported is lost."""
        self.close(0.1)

    def counts(self) -> dict[str, Any]:
        """This worker's counters and its exporter's (when it keeps any)."""
        out: dict[str, Any] = {
            "records": self.records,
            "records_dropped": self.records_dropped,
            "collections": self.collections,
            "exports_failed": self.exports_failed,
            "series_overflowed": self.aggregator.overflowed,
            "errors": self.errors,
        }
        exporter_counts = getattr(self.exporter, "counts", None)
        if isinstance(exporter_counts, dict):
            out["exporter"] = exporter_counts
        return out

    def close(self, timeout_s: float) -> None:
        """Record what is buffered, export a last collection, stop; at most ``timeout_s``."""
        if self._closed:
            return
        self._deadline = time.monotonic() + timeout_s
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s + 0.5)
        self._drops.close()

    # -- the worker's thread ---------------------------------------------------------------

    def _drop_totals(self) -> dict[str, int]:
        return {"records": self.records_dropped}

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while True:
            self._wake.wait(min(0.1, max(0.0, next_at - time.monotonic())))
            self._wake.clear()
            self._record_pending()
            if self._closed:
                break
            if time.monotonic() >= next_at:
                self._export(self.export_timeout_s)
                next_at = time.monotonic() + self.interval_s
        left = max(0.05, self._deadline - time.monotonic())
        self._export(min(left, self.export_timeout_s))
        try:
            self.exporter.shutdown(timeout_millis=left * 1000)
        except Exception:
            _log.exception("metrics exporter shutdown failed")

    def _record_pending(self) -> None:
        pending, record = self._pending, self.metrics.record
        while pending:
            rec = pending.popleft()
            try:
                record(rec)
                self.records += 1
            except Exception:
                self.errors += 1
                if self.errors & (self.errors - 1) == 0:
                    _log.exception("metrics of a record failed", count=self.errors)

    def _export(self, timeout_s: float) -> None:
        try:
            if self.observe is not None:
                self.observe()
            active = self.active
            if active is not None:
                self.metrics.set_active(dict(active))  # one C call: a consistent copy
            data = self.aggregator.collect()
        except Exception:
            self.errors += 1
            _log.exception("metrics collection failed")
            return
        self.collections += 1
        if data is None:
            return
        result = self.exporter.export(data, timeout_millis=timeout_s * 1000)
        if result.name != "SUCCESS":
            self.exports_failed += 1
