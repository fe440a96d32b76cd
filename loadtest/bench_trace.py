"""Benchmark: building the trace of the demo's happy-path request.

Records one real happy-path request (``GET /blogs/posts/{id}``, cache hit:
6 spans, 17 events) through the demo app with fake interpreters, then times
``TraceEngine.build`` on that record. For scale, the same run times the
OpenTelemetry SDK creating the same six spans with the same attributes and
events (no processor, so no export cost on either side).

Run: ``python loadtest/bench_trace.py [--n 20000]``.
"""

from __future__ import annotations

import argparse
import random
import time

import anyio
from opentelemetry.sdk.trace import TracerProvider

from zerver import RequestRecord, VirtualClock, load_settings
from zerver._sinks import InMemorySpanSink
from zerver._spans import SpanData
from zerver.demo import SEED_AUTHORS, SEED_POSTS, create_app
from zerver.testing import AppClient, FakeInterpreter, RecordCapture


async def record_happy_path() -> tuple[RequestRecord, object]:
    clock = VirtualClock()
    app = create_app(settings=load_settings({}), clock=clock, rng=random.Random(1))
    fake = FakeInterpreter(clock)
    fake.on(
        "db.get blog_post", result=SEED_POSTS["1"], work_ms=0.4, parks=[("io_wait", 1.2, "sqlite")]
    )
    fake.on("cache.get author_profile", result=SEED_AUTHORS["ada"], note={"cache.hit": True})
    app.interpreter("db", fake)
    app.interpreter("cache", fake)
    cap = RecordCapture()
    app.subscribe(cap)
    engine = app.trace_to(InMemorySpanSink())
    async with AppClient(app) as c:
        await c.get("/blogs/posts/1", headers=[("user-agent", "bench")])
    return cap.last, engine


def bench_build(n: int) -> tuple[float, int, int]:
    record, engine = anyio.run(record_happy_path)
    spans = engine.build(record)  # type: ignore[attr-defined]
    n_events = sum(len(s.events) for s in spans)
    for _ in range(1000):
        engine.build(record)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for _ in range(n):
        engine.build(record)  # type: ignore[attr-defined]
    return (time.perf_counter() - t0) / n * 1e6, len(spans), n_events


def bench_pack(n: int) -> float:
    """What the request path pays when an exporter process builds the spans."""
    from zerver._offload import pack_record

    record, _engine = anyio.run(record_happy_path)
    for _ in range(1000):
        pack_record(record)
    t0 = time.perf_counter()
    for _ in range(n):
        pack_record(record)
    return (time.perf_counter() - t0) / n * 1e6


def bench_otel_sdk(n: int, spans_per_trace: int, template: list[SpanData]) -> float:
    provider = TracerProvider()
    tracer = provider.get_tracer("bench")

    def one() -> None:
        for s in template:
            span = tracer.start_span(s.name, attributes=s.attributes)
            for name, _time_ns, attributes, _dropped in s.events:
                span.add_event(name, attributes)
            span.end()

    for _ in range(200):
        one()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    build_us, n_spans, n_events = min((bench_build(args.n) for _ in range(3)), key=lambda r: r[0])
    record, engine = anyio.run(record_happy_path)
    template = engine.build(record)  # type: ignore[attr-defined]
    sdk_us = min(bench_otel_sdk(max(args.n // 4, 500), n_spans, template) for _ in range(3))
    pack_us = min(bench_pack(args.n) for _ in range(3))
    print(f"happy-path trace: {n_spans} spans, {n_events} events")
    print(f"request path with an exporter process (pack only): {pack_us:7.2f} µs/request")
    print(f"zerver TraceEngine.build    : {build_us:7.2f} µs/request (budget 15 µs)")
    print(
        f"OpenTelemetry SDK, same tree: {sdk_us:7.2f} µs/request "
        f"({sdk_us / n_spans:.2f} µs/span); ratio {sdk_us / build_us:.1f}x"
    )


if __name__ == "__main__":
    main()
