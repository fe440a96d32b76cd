"""OTLP/HTTP metrics export: the SDK's metric data as official protobuf, sent like spans.

:class:`OtlpMetricExporter` is an OpenTelemetry SDK ``MetricExporter``: a
``PeriodicExportingMetricReader`` hands it ``MetricsData`` every
``OTEL_METRIC_EXPORT_INTERVAL``. It encodes the data with the official
``opentelemetry-proto`` messages (:func:`encode_metrics`), as protobuf or as
OTLP/JSON (lowerCamelCase keys, integer enums, 64-bit integers as strings, hex
trace and span ids), and POSTs it to ``/v1/metrics`` through the traces'
machinery: :class:`~zerver.export.OtlpHttpExporter` (keep-alive ``http.client``,
never traced, status classified) under the same retry, circuit breaker and rate
limit layers (:class:`~zerver.export.ResilienceBuilder`). Nothing is raised to
the reader; a failed export is counted in :attr:`OtlpMetricExporter.counts`.

:func:`meter_provider` builds the ``MeterProvider`` the settings describe
(:class:`~zerver.export.MetricsExportConfig`), with the trace-based exemplar
filter and a ``service.instance.id`` for this process.
"""

from __future__ import annotations

import base64
import gzip
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope as PbScope
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.sdk.metrics import (
    Counter,
    MeterProvider,
    ObservableCounter,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics._internal.exemplar import Exemplar as SdkExemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    ExponentialHistogram,
    Gauge,
    Histogram,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource

from ._base import (
    BatchExporter,
    ExportContext,
    ExportResult,
    ExportStatus,
    RealTimer,
    Timer,
)
from ._config import DEFAULT_METRICS_ENDPOINT, ExportConfig, MetricsExportConfig
from ._log import RateLimitedLog
from ._pipeline import Counters
from ._protobuf import key_values
from ._resilience import ResilienceBuilder
from ._spans import AttrValue, SpanData
from ._transport import OtlpHttpExporter

__all__ = [
    "OtlpMetricExporter",
    "encode_metrics",
    "meter_provider",
    "metrics_from_json",
    "metrics_json",
    "temporality_preference",
]


_CONTENT_TYPES = {"http/json": "application/json", "http/protobuf": "application/x-protobuf"}


def temporality_preference(name: str) -> dict[type, AggregationTemporality]:
    """The instrument temporalities ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``
    names, as the OpenTelemetry SDKs read it (instruments not named stay cumulative):
    ``delta`` makes counters and histograms delta, ``lowmemory`` the synchronous ones."""
    delta = AggregationTemporality.DELTA
    if name == "cumulative":
        return {}
    if name == "delta":
        return {Counter: delta, HistogramInstrument: delta, ObservableCounter: delta}
    if name == "lowmemory":
        return {Counter: delta, HistogramInstrument: delta}
    raise ValueError(f"temporality {name!r} is not cumulative, delta or lowmemory")


# -- encoding -----------------------------------------------------------------------------


def _temporality(t: AggregationTemporality) -> pb.AggregationTemporality.ValueType:
    # The SDK's enum has the proto's numbers (DELTA = 1, CUMULATIVE = 2).
    return cast("pb.AggregationTemporality.ValueType", int(t))


def _set_value(message: pb.Exemplar | pb.NumberDataPoint, value: float) -> None:
    if isinstance(value, int):
        message.as_int = value
    else:
        message.as_double = value


def _exemplars(exemplars: Sequence[SdkExemplar]) -> list[pb.Exemplar]:
    out = []
    for e in exemplars:
        ex = pb.Exemplar(
            filtered_attributes=key_values(e.filtered_attributes or {}),
            time_unix_nano=e.time_unix_nano,
        )
        _set_value(ex, e.value)
        if e.trace_id and e.span_id:
            ex.trace_id = e.trace_id.to_bytes(16, "big")
            ex.span_id = e.span_id.to_bytes(8, "big")
        out.append(ex)
    return out


def _number_points(points: Iterable[Any]) -> list[pb.NumberDataPoint]:
    out = []
    for p in points:
        pt = pb.NumberDataPoint(
            attributes=key_values(p.attributes or {}),
            start_time_unix_nano=p.start_time_unix_nano or 0,
            time_unix_nano=p.time_unix_nano,
            exemplars=_exemplars(p.exemplars),
        )
        _set_value(pt, p.value)
        out.append(pt)
    return out


_HistogramPoint = TypeVar(
    "_HistogramPoint", pb.HistogramDataPoint, pb.ExponentialHistogramDataPoint
)


def _histogram_point(cls: type[_HistogramPoint], p: Any, **buckets: Any) -> _HistogramPoint:
    """A histogram point of either kind: the fields both have, and the kind's ``buckets``."""
    point = cls(
        attributes=key_values(p.attributes or {}),
        start_time_unix_nano=p.start_time_unix_nano,
        time_unix_nano=p.time_unix_nano,
        count=p.count,
        sum=p.sum,
        exemplars=_exemplars(p.exemplars),
        **buckets,
    )
    if p.count:
        point.min, point.max = p.min, p.max
    return point


def _buckets(b: Any) -> pb.ExponentialHistogramDataPoint.Buckets:
    return pb.ExponentialHistogramDataPoint.Buckets(offset=b.offset, bucket_counts=b.bucket_counts)


def _metric(m: Any) -> pb.Metric:
    pm = pb.Metric(name=m.name, description=m.description or "", unit=m.unit or "")
    data = m.data
    if isinstance(data, Sum):
        pm.sum.CopyFrom(
            pb.Sum(
                data_points=_number_points(data.data_points),
                aggregation_temporality=_temporality(data.aggregation_temporality),
                is_monotonic=data.is_monotonic,
            )
        )
    elif isinstance(data, Gauge):
        pm.gauge.CopyFrom(pb.Gauge(data_points=_number_points(data.data_points)))
    elif isinstance(data, Histogram):
        pm.histogram.CopyFrom(
            pb.Histogram(
                data_points=[
                    _histogram_point(
                        pb.HistogramDataPoint,
                        p,
                        bucket_counts=p.bucket_counts,
                        explicit_bounds=p.explicit_bounds,
                    )
                    for p in data.data_points
                ],
                aggregation_temporality=_temporality(data.aggregation_temporality),
            )
        )
    elif isinstance(data, ExponentialHistogram):
        pm.exponential_histogram.CopyFrom(
            pb.ExponentialHistogram(
                data_points=[
                    _histogram_point(
                        pb.ExponentialHistogramDataPoint,
                        p,
                        scale=p.scale,
                        zero_count=p.zero_count,
                        positive=_buckets(p.positive),
                        negative=_buckets(p.negative),
                        flags=p.flags,
                    )
                    for p in data.data_points
                ],
                aggregation_temporality=_temporality(data.aggregation_temporality),
            )
        )
    return pm


def encode_metrics(data: MetricsData) -> tuple[ExportMetricsServiceRequest, int]:
    """``data`` as an official ``ExportMetricsServiceRequest``, and its number of points."""
    request = ExportMetricsServiceRequest()
    points = 0
    for rm in data.resource_metrics:
        out = request.resource_metrics.add(
            resource=PbResource(attributes=key_values(rm.resource.attributes)),
            schema_url=rm.schema_url or "",
        )
        for sm in rm.scope_metrics:
            scope = sm.scope
            metrics = [_metric(m) for m in sm.metrics]
            points += sum(len(m.data.data_points) for m in sm.metrics)
            out.scope_metrics.add(
                scope=PbScope(name=scope.name, version=scope.version or ""),
                metrics=metrics,
                schema_url=sm.schema_url or "",
            )
    return request, points


_POINT_KINDS = ("sum", "gauge", "histogram", "exponentialHistogram")


def _exemplar_ids(doc: dict[str, Any], convert: Callable[[str], str]) -> dict[str, Any]:
    """``doc`` (a metrics request in JSON form) with each exemplar's trace and span id
    passed through ``convert``, in place."""
    metrics = (
        m
        for rm in doc.get("resourceMetrics", ())
        for sm in rm.get("scopeMetrics", ())
        for m in sm.get("metrics", ())
    )
    for m in metrics:
        for kind in _POINT_KINDS:
            for p in m.get(kind, {}).get("dataPoints", ()):
                for e in p.get("exemplars", ()):
                    for key in ("traceId", "spanId"):
                        if key in e:
                            e[key] = convert(e[key])
    return doc


def metrics_json(request: ExportMetricsServiceRequest) -> bytes:
    """``request`` as an OTLP/JSON body: protobuf's JSON mapping with integer enums, and
    trace and span ids as hex (OTLP/JSON's one departure from that mapping)."""
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    return orjson.dumps(_exemplar_ids(doc, lambda b64: base64.b64decode(b64).hex()))


def metrics_from_json(body: bytes | dict[str, Any]) -> ExportMetricsServiceRequest:
    """An OTLP/JSON metrics body (or the document it decodes to, which is changed in
    place) as the official message: :func:`metrics_json`'s inverse. Raises on a body
    the schema does not accept."""
    doc = orjson.loads(body) if isinstance(body, bytes) else body
    doc = _exemplar_ids(doc, lambda h: base64.b64encode(bytes.fromhex(h)).decode())
    request: ExportMetricsServiceRequest = json_format.ParseDict(doc, ExportMetricsServiceRequest())
    return request


# -- the exporter ---------------------------------------------------------------------------


class _MetricsBody(list[SpanData]):
    """An encoded metrics request travelling down the span exporter layers.

    Empty as a list (those layers count spans; a metrics body has none), carrying
    the body, what describes it and its number of data points."""

    __slots__ = ("body", "meta", "points")

    def __init__(self, body: bytes, meta: dict[str, str], points: int) -> None:
        super().__init__()
        self.body = body
        self.meta = meta
        self.points = points


class _BodySender:
    """The innermost layer: one POST of a prepared metrics body."""

    __slots__ = ("inner",)

    def __init__(self, inner: OtlpHttpExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        if not isinstance(spans, _MetricsBody):
            return ExportResult(ExportStatus.PERMANENT, detail="not a metrics body")
        return self.inner.send_body(spans.body, spans.meta, spans.points, ctx)

    def shutdown(self) -> None:
        self.inner.shutdown()


class OtlpMetricExporter(MetricExporter):
    """Exports SDK metric data to an OTLP/HTTP ``/v1/metrics`` endpoint.

    ``export`` config (:class:`~zerver.export.ExportConfig`) adds its circuit
    breaker and rate limits to the retries; without it, only retries apply
    (429/502/503/504 and connection errors, ``Retry-After`` honoured, within the
    export's deadline). Counters: ``exports``, ``data_points``, ``failed``
    (exports the backend never took), ``retries``, ``encode_errors``.

    Example::

        exporter = OtlpMetricExporter("http://localhost:4318/v1/metrics")
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=10_000)
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_METRICS_ENDPOINT,
        *,
        protocol: str = "http/json",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        timeout_s: float = 10.0,
        compression: str = "none",
        temporality: str = "cumulative",
        export: ExportConfig | None = None,
        log: RateLimitedLog | None = None,
        timer: Timer | None = None,
    ) -> None:
        if protocol not in _CONTENT_TYPES:
            raise ValueError(f"protocol {protocol!r} is not 'http/json' or 'http/protobuf'")
        if compression not in ("gzip", "none"):
            raise ValueError(f"compression {compression!r} is not 'gzip' or 'none'")
        super().__init__(preferred_temporality=temporality_preference(temporality))
        self.endpoint = endpoint
        self._protobuf = protocol == "http/protobuf"
        self._meta = {"content_type": _CONTENT_TYPES[protocol]}
        if compression == "gzip":
            self._meta["content_encoding"] = "gzip"
        self._log = log or RateLimitedLog()
        transport = OtlpHttpExporter(
            endpoint,
            protocol=protocol,
            headers=headers,
            timeout_s=timeout_s,
            log=self._log,
            ssl_context=export.ssl_context() if export is not None else None,
        )
        sender: BatchExporter = _BodySender(transport)
        if export is not None:
            self._chain = ResilienceBuilder.from_config(sender, export).build()
        else:
            self._chain = ResilienceBuilder(sender).retry().build()
        self._timer = timer or RealTimer()
        self._counts = Counters()

    @classmethod
    def from_config(
        cls, config: MetricsExportConfig, export: ExportConfig | None = None, **kwargs: Any
    ) -> OtlpMetricExporter:
        """An exporter for ``config``'s endpoint, protocol, headers, timeout, compression
        and temporality; ``export`` adds the traces' breaker, rate limits and TLS files."""
        return cls(
            config.endpoint,
            protocol=config.protocol,
            headers=config.headers,
            timeout_s=config.timeout_s,
            compression=config.compression,
            temporality=config.temporality,
            export=export,
            **kwargs,
        )

    @property
    def counts(self) -> dict[str, int]:
        """A copy of the exporter's counters."""
        return dict(self._counts.values)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Encode and send ``metrics_data`` within ``timeout_millis``; never raises."""
        counts = self._counts
        try:
            request, points = encode_metrics(metrics_data)
            if not points:
                return MetricExportResult.SUCCESS
            body = request.SerializeToString() if self._protobuf else metrics_json(request)
        except Exception as exc:
            counts.add("encode_errors")
            self._log.warning("metrics_encode", "metrics not encoded; dropped", error=repr(exc))
            return MetricExportResult.FAILURE
        if "content_encoding" in self._meta:
            body = gzip.compress(body, compresslevel=1)
        ctx = ExportContext(self._timer, self._timer.monotonic() + timeout_millis / 1000, counts)
        result = self._chain.export(_MetricsBody(body, self._meta, points), ctx)
        counts.add("exports")
        if result.status is ExportStatus.SUCCESS:
            counts.add("data_points", points)
            return MetricExportResult.SUCCESS
        counts.add("failed")
        self._log.warning(
            f"metrics_{result.status.value}",
            "metrics export failed; points dropped",
            endpoint=self.endpoint,
            detail=result.detail,
        )
        return MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Nothing is buffered here: each ``export`` sends at once."""
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Close the connection."""
        self._chain.shutdown()


def meter_provider(
    config: MetricsExportConfig,
    resource: Mapping[str, AttrValue] | None = None,
    *,
    export: ExportConfig | None = None,
    views: Sequence[View] = (),
    readers: Sequence[MetricReader] = (),
    shutdown_on_exit: bool = True,
) -> MeterProvider | None:
    """The ``MeterProvider`` ``config`` describes; ``None`` when metrics are off
    (``OTEL_METRICS_EXPORTER=none`` and no extra ``readers``).

    ``resource``: the process's resource attributes (pass the ones its traces carry,
    so both name the same ``service.instance.id``); a ``service.instance.id`` is
    made for this process when absent, so each worker of ``--workers N`` reports
    its own series and a backend can add them up. ``export`` (the traces'
    configuration) lends its breaker, rate limits and TLS files to the OTLP
    exporter. The provider filters exemplars with the SDK's
    ``TraceBasedExemplarFilter`` (only sampled spans become exemplars).
    Shut it down (``provider.shutdown()``) to export what is left.
    """
    all_readers = list(readers)
    if config.exporter != "none":
        exporter: MetricExporter
        if config.exporter == "console":
            exporter = ConsoleMetricExporter(
                preferred_temporality=temporality_preference(config.temporality)
            )
        else:
            exporter = OtlpMetricExporter.from_config(config, export)
        all_readers.append(
            PeriodicExportingMetricReader(
                exporter,
                export_interval_millis=config.interval_s * 1000,
                export_timeout_millis=config.export_timeout_s * 1000,
            )
        )
    if not all_readers:
        return None
    attrs = dict(resource or {})
    attrs.setdefault("service.instance.id", str(uuid.uuid4()))
    return MeterProvider(
        all_readers,
        resource=Resource(attrs),
        exemplar_filter=TraceBasedExemplarFilter(),
        shutdown_on_exit=shutdown_on_exit,
        views=views,
    )
