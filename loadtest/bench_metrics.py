"""Benchmark: recording the metrics of a finished request, against building its trace.

Records real happy-path requests of the demo (``GET /blogs/posts/{id}``, cache
hit, a DB ``io_wait`` park; as ``bench_trace.py`` does), then, in the same run:

- ``RecordMetrics.record`` on those records as the exporter process receives them
  (``unpack_record(pack_record(r))``), with an SDK ``MeterProvider`` whose reader
  collects on demand (no export cost), in ``new`` and ``dup`` semconv modes, half
  of the records sampled so half the measurements offer exemplars;
- the same through zerver's own :class:`~zerver.trace._aggregate.Aggregator` (what the
  server uses), collected into the same ``MetricsData``;
- ``TraceEngine.build`` of the same records (``bench_trace.py``'s figure).

Each record gives 22 measurements in ``new`` mode (HTTP duration and two sizes,
three steps, two effects with their queue wait, dispatch, run and depth, one
park, one cache hit) and 25 in ``dup``. The figure is µs per record.

Run: ``python -m loadtest.bench_metrics [--n 20000]``.
"""

from __future__ import annotations

import argparse
import time

import anyio
from opentelemetry.sdk.metrics import MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from loadtest.bench_trace import bench_build, record_happy_paths
from zerver import RecordMetrics
from zerver.trace import RequestRecord
from zerver.trace._aggregate import Aggregator
from zerver.trace._offload import pack_record, unpack_record

RECORDS = 64


def bench_metrics(
    records: list[RequestRecord], mode: str, n: int, own: bool = False
) -> tuple[float, int]:
    """Mean µs per ``record`` call, and the points one collection gives; ``own``:
    zerver's :class:`~zerver.trace._aggregate.Aggregator` instead of the SDK's provider."""
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader], exemplar_filter=TraceBasedExemplarFilter())
    agg = Aggregator()
    metrics = RecordMetrics(agg if own else provider, mode)
    k = len(records)
    for i in range(2000):
        metrics.record(records[i % k])
    t0 = time.perf_counter()
    for i in range(n):
        metrics.record(records[i % k])
    us = (time.perf_counter() - t0) / n * 1e6
    data = agg.collect() if own else reader.get_metrics_data()
    points = 0
    if data is not None:
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                points += sum(len(m.data.data_points) for m in sm.metrics)
    provider.shutdown()
    return us, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    records, engine = anyio.run(record_happy_paths, RECORDS)
    unpacked = [unpack_record(pack_record(r)) for r in records]
    for i, r in enumerate(unpacked):
        r.trace_flags = 0x01 if i % 2 == 0 else 0x00
    trace_us = min(bench_build(records, engine, args.n)[0] for _ in range(3))
    for mode in ("new", "dup"):
        for own, what in ((False, "SDK MeterProvider"), (True, "zerver Aggregator")):
            us, points = min(bench_metrics(unpacked, mode, args.n, own) for _ in range(3))
            print(
                f"RecordMetrics.record ({mode}, {what}): {us:7.2f} µs/record "
                f"({points} points per collection; {us / trace_us:.2f}x the trace build)"
            )
    print(f"TraceEngine.build, same records: {trace_us:7.2f} µs/record")


if __name__ == "__main__":
    main()
