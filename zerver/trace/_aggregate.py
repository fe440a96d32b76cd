"""Metric aggregation by hand, for the rates a server's records arrive at.

The OpenTelemetry metrics SDK costs 15 to 25 µs per measurement (attribute hashing,
a lock, a ``Context`` per exemplar offer, a reservoir per point); a blog request
gives 22 to 25 measurements, so recording its metrics through the SDK cost 330 to 590 µs
where building its whole trace costs about 35 µs (``python -m
loadtest.bench_metrics``). This module does the SDK's job for the three
aggregations zerver's instruments use, and hands the SDK's own point types
(``MetricsData``) to any SDK ``MetricExporter`` at collection:

* :class:`HistogramTable`: explicit-bucket histograms (count, sum, min, max,
  bucket counts), with the SDK's aligned-bucket exemplar reservoir: each bucket
  keeps the last sampled measurement offered to it since the last collection;
* :class:`SumTable`: monotonic counters and up-down counters, keeping the last
  sampled measurement as the point's one exemplar;
* :class:`GaugeTable`: the last value set, with its exemplar.

Rules, as the SDK's:

* A series is an attribute set; at most ``cardinality_limit`` series per
  instrument (the SDK's default, 2000), and measurements of any further set go to
  the series ``{"otel.metric.overflow": true}`` (counted in
  :attr:`Aggregator.overflowed`).
* Bucket ``i`` counts values ``v`` with ``bounds[i-1] < v <= bounds[i]``; the last
  bucket everything above the last bound.
* Temporality per instrument kind, as ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``
  names it: ``cumulative`` (points since a series was created), ``delta``
  (counters and histograms: points since the last collection, series reset) or
  ``lowmemory`` (delta for counters and histograms, cumulative for up-down
  counters). Gauges have none.
* Exemplars only come from measurements given a span (``span_id != 0``): the
  caller passes one only for sampled requests, as the SDK's
  ``TraceBasedExemplarFilter`` does. Exemplars are cleared at each collection.

Sans-I/O and single-threaded: one thread records and collects (the exporter
process's build loop); the result of :meth:`Aggregator.collect` is plain data
another thread may send. Attribute sets are passed as dicts the caller keeps
and reuses (``RecordMetrics`` caches them): a series is found by the dict's
identity first, by its contents on a miss.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

from opentelemetry.sdk.metrics._internal.exemplar import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = [
    "DEFAULT_CARDINALITY_LIMIT",
    "OVERFLOW_ATTRIBUTES",
    "Aggregator",
    "GaugeTable",
    "HistogramTable",
    "SumTable",
]

#: Attribute values as zerver's instruments use them.
Attrs: TypeAlias = Mapping[str, str | int | bool]

#: Series per instrument before measurements go to the overflow series (the SDK's default).
DEFAULT_CARDINALITY_LIMIT = 2000
#: The attributes of the overflow series (the metrics SDK specification's).
OVERFLOW_ATTRIBUTES: Attrs = {"otel.metric.overflow": True}

_TEMPORALITIES = ("cumulative", "delta", "lowmemory")
_DELTA = AggregationTemporality.DELTA
_CUMULATIVE = AggregationTemporality.CUMULATIVE


class _Series:
    """One attribute set's state; the tables below read and write its slots."""

    __slots__ = ("attrs", "buckets", "count", "exemplars", "max", "min", "start_ns", "sum")

    def __init__(self, attrs: Attrs, start_ns: int, buckets: int) -> None:
        self.attrs = attrs
        self.start_ns = start_ns
        self.count = 0
        self.sum: float = 0
        self.min = float("inf")
        self.max = float("-inf")
        self.buckets = [0] * buckets
        # Histograms: (value, time, trace id, span id) per bucket; sums and gauges use slot 0.
        self.exemplars: list[tuple[float, int, int, int] | None] = [None] * max(1, buckets)


class _Table:
    """The series of one instrument, found by the attribute dict's identity."""

    __slots__ = ("_by_id", "_owner", "_series", "delta", "description", "name", "unit")

    _width = 0  # bucket slots per series

    def __init__(
        self, owner: Aggregator, name: str, unit: str, description: str, *, delta: bool
    ) -> None:
        self._owner = owner
        self.name = name
        self.unit = unit
        self.description = description
        self.delta = delta
        self._series: dict[tuple[tuple[str, object], ...], _Series] = {}
        # id(attrs) -> (attrs, series): holding ``attrs`` keeps its id from being
        # reused by another dict while the entry exists.
        self._by_id: dict[int, tuple[Attrs, _Series]] = {}

    def _find(self, attrs: Attrs) -> _Series:
        hit = self._by_id.get(id(attrs))
        if hit is not None and hit[0] is attrs:
            return hit[1]
        key = tuple(sorted(attrs.items()))
        series = self._series.get(key)
        if series is None:
            owner = self._owner
            if len(self._series) >= owner.cardinality_limit:
                owner.overflowed += 1
                key = tuple(OVERFLOW_ATTRIBUTES.items())
                series = self._series.get(key)
                attrs = OVERFLOW_ATTRIBUTES
            if series is None:
                # A delta point covers the time since the last collection.
                start = owner.collected_ns if self.delta else owner.now_ns()
                series = _Series(dict(attrs), start, self._width)
                self._series[key] = series
        if len(self._by_id) >= 4 * self._owner.cardinality_limit:
            self._by_id.clear()
        self._by_id[id(attrs)] = (attrs, series)
        return series

    def _collected(self) -> list[_Series]:
        """Every series with a measurement; a delta table starts over."""
        series = [s for s in self._series.values() if s.count]
        if self.delta:
            self._series = {}
            self._by_id.clear()
        return series

    def _exemplars(self, s: _Series) -> list[Exemplar]:
        out = []
        for e in s.exemplars:
            if e is not None:
                value, t, trace_id, span_id = e
                out.append(Exemplar(None, value, t, span_id, trace_id))
        s.exemplars = [None] * len(s.exemplars)
        return out

    def _number_points(self, series: list[_Series], now_ns: int) -> list[NumberDataPoint]:
        """Sums' and gauges' points: each series' value (kept in ``sum``)."""
        return [
            NumberDataPoint(
                attributes=s.attrs,
                start_time_unix_nano=s.start_ns,
                time_unix_nano=now_ns,
                value=s.sum,
                exemplars=self._exemplars(s),
            )
            for s in series
        ]

    def collect(self, now_ns: int) -> Metric | None:
        raise NotImplementedError


class HistogramTable(_Table):
    """An explicit-bucket histogram (``bounds`` ascending)."""

    __slots__ = ("_width", "bounds")

    def __init__(
        self,
        owner: Aggregator,
        name: str,
        unit: str,
        description: str,
        bounds: Sequence[float],
        *,
        delta: bool,
    ) -> None:
        super().__init__(owner, name, unit, description, delta=delta)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: bucket bounds must be strictly ascending: {bounds!r}")
        self.bounds = tuple(bounds)
        self._width = len(self.bounds) + 1

    def record(self, value: float, attrs: Attrs, trace_id: int = 0, span_id: int = 0) -> None:
        """One measurement; ``span_id`` (with ``trace_id``) makes it an exemplar candidate."""
        s = self._find(attrs)
        i = bisect_left(self.bounds, value)
        s.buckets[i] += 1
        s.count += 1
        s.sum += value
        # Comparisons, not min()/max(): no call on the hot path.
        if value < s.min:  # noqa: PLR1730
            s.min = value
        if value > s.max:  # noqa: PLR1730
            s.max = value
        if span_id:
            s.exemplars[i] = (value, self._owner.now_ns(), trace_id, span_id)

    def collect(self, now_ns: int) -> Metric | None:
        series = self._collected()
        if not series:
            return None
        points = [
            HistogramDataPoint(
                attributes=s.attrs,
                start_time_unix_nano=s.start_ns,
                time_unix_nano=now_ns,
                count=s.count,
                sum=s.sum,
                bucket_counts=list(s.buckets),
                explicit_bounds=list(self.bounds),
                min=s.min,
                max=s.max,
                exemplars=self._exemplars(s),
            )
            for s in series
        ]
        temporality = _DELTA if self.delta else _CUMULATIVE
        return Metric(self.name, self.description, self.unit, Histogram(points, temporality))


class SumTable(_Table):
    """A counter (``monotonic``: only non-negative increments) or an up-down counter."""

    __slots__ = ("monotonic",)

    def __init__(
        self,
        owner: Aggregator,
        name: str,
        unit: str,
        description: str,
        *,
        monotonic: bool,
        delta: bool,
    ) -> None:
        super().__init__(owner, name, unit, description, delta=delta)
        self.monotonic = monotonic

    def add(self, amount: float, attrs: Attrs, trace_id: int = 0, span_id: int = 0) -> None:
        """Add ``amount``; a negative one on a monotonic counter is dropped, as the SDK does."""
        if amount < 0 and self.monotonic:
            self._owner.invalid += 1
            return
        s = self._find(attrs)
        s.sum += amount
        s.count += 1
        if span_id:
            s.exemplars[0] = (amount, self._owner.now_ns(), trace_id, span_id)

    def collect(self, now_ns: int) -> Metric | None:
        series = self._collected()
        if not series:
            return None
        points = self._number_points(series, now_ns)
        temporality = _DELTA if self.delta else _CUMULATIVE
        return Metric(
            self.name, self.description, self.unit, Sum(points, temporality, self.monotonic)
        )


class GaugeTable(_Table):
    """The last value set per attribute set."""

    __slots__ = ()

    def set(self, value: float, attrs: Attrs, trace_id: int = 0, span_id: int = 0) -> None:
        s = self._find(attrs)
        s.sum = value
        s.count += 1
        if span_id:
            s.exemplars[0] = (value, self._owner.now_ns(), trace_id, span_id)

    def collect(self, now_ns: int) -> Metric | None:
        series = self._collected()
        if not series:
            return None
        points = self._number_points(series, now_ns)
        return Metric(self.name, self.description, self.unit, Gauge(points))


class Aggregator:
    """The instruments of one process and their collection into ``MetricsData``.

    ``temporality``: ``cumulative``, ``delta`` or ``lowmemory`` (see the module
    docstring). ``now_ns``: the wall clock, in ns since the epoch (injected in tests).

    Example::

        agg = Aggregator(resource=Resource({"service.name": "blog"}))
        latency = agg.histogram("http.server.request.duration", "s", "...", (0.1, 1.0))
        latency.record(0.05, {"http.route": "/posts/{id}"})
        data = agg.collect()  # MetricsData for any SDK MetricExporter
    """

    def __init__(
        self,
        *,
        resource: Resource | None = None,
        scope: InstrumentationScope | None = None,
        temporality: str = "cumulative",
        cardinality_limit: int = DEFAULT_CARDINALITY_LIMIT,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if temporality not in _TEMPORALITIES:
            raise ValueError(f"temporality {temporality!r} is not cumulative, delta or lowmemory")
        if cardinality_limit < 1:
            raise ValueError(f"cardinality limit must be at least 1, got {cardinality_limit}")
        self.resource = resource if resource is not None else Resource.get_empty()
        self.scope = scope if scope is not None else InstrumentationScope("zerver")
        self.temporality = temporality
        self.cardinality_limit = cardinality_limit
        self.now_ns = now_ns
        self._tables: list[_Table] = []
        self.collected_ns = now_ns()
        """When the last collection (or the aggregator) started: delta points' start."""
        self.overflowed = 0
        """Measurements that went to an overflow series (cumulative)."""
        self.invalid = 0
        """Negative increments of monotonic counters, dropped (cumulative)."""

    def _add(self, table: _Table) -> None:
        if any(t.name == table.name for t in self._tables):
            raise ValueError(f"instrument {table.name!r} already exists")
        self._tables.append(table)

    def histogram(
        self, name: str, unit: str, description: str, bounds: Sequence[float]
    ) -> HistogramTable:
        table = HistogramTable(
            self, name, unit, description, bounds, delta=self.temporality != "cumulative"
        )
        self._add(table)
        return table

    def counter(self, name: str, unit: str, description: str) -> SumTable:
        table = SumTable(
            self,
            name,
            unit,
            description,
            monotonic=True,
            delta=self.temporality != "cumulative",
        )
        self._add(table)
        return table

    def up_down_counter(self, name: str, unit: str, description: str) -> SumTable:
        table = SumTable(
            self,
            name,
            unit,
            description,
            monotonic=False,
            delta=self.temporality == "delta",
        )
        self._add(table)
        return table

    def gauge(self, name: str, unit: str, description: str) -> GaugeTable:
        table = GaugeTable(self, name, unit, description, delta=False)
        self._add(table)
        return table

    def collect(self) -> MetricsData | None:
        """Every instrument's points now; ``None`` when none has any."""
        now = self.now_ns()
        metrics = [m for t in self._tables if (m := t.collect(now)) is not None]
        self.collected_ns = now
        if not metrics:
            return None
        scope_metrics = ScopeMetrics(self.scope, metrics, "")
        return MetricsData([ResourceMetrics(self.resource, [scope_metrics], "")])
