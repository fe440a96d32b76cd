"""Benchmark: zerver's export pipeline against the OpenTelemetry SDK, same spans, same run.

Measures, on realistic CLIENT spans (6 attributes, one event):

- encode µs/span: zerver's OTLP/JSON writer, protobuf wire writer
  (``ProtobufWireEncoder``, opt-in) and official-message protobuf encoder
  (``ProtobufEncoder``, what ``http/protobuf`` uses by default) vs the official
  ``opentelemetry.exporter.otlp.proto.common`` encoder (+ ``SerializeToString``);
  a hand-built dict + ``orjson.dumps`` and ``pickle`` (the cost of handing a
  span to another process) for scale;
- submit µs/span: ``ExportPipeline.submit`` vs the SDK ``BatchSpanProcessor.on_end``;
- end-to-end spans/s into a local OTLP/HTTP receiver: zerver pipeline (JSON;
  protobuf with the default encoder and with the wire writer; JSON with one
  worker) vs ``BatchSpanProcessor`` + the official ``OTLPSpanExporter``
  (protobuf), with each side's CPU per span;
- one POST on a kept-alive connection: stdlib ``http.client`` vs ``httpx``.

The end-to-end receiver runs in a child process, as a collector would.

- event-loop interference: how late a 1 ms ``asyncio.sleep`` on the main thread
  wakes while each exporter drains a backlog on its background thread(s).

Run: ``python loadtest/bench_export.py [--spans 100000] [--repeat 3]
[--only e2e,loop] [--switch-interval 0.001]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import multiprocessing
import pickle
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import httpx
import orjson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope

from zerver.export import (
    ExportPipeline,
    JsonEncoder,
    NoopExporter,
    OtlpHttpExporter,
    OtlpReceiver,
    ProtobufEncoder,
    ProtobufWireEncoder,
    ResilienceBuilder,
    span_to_readable,
)
from zerver.export._spans import InstrumentationScope, Resource, SpanData, SpanEvent, SpanKind

T0 = 1_700_000_000_000_000_000
RES = Resource(attributes={"service.name": "blog", "host.name": "box-1", "service.version": "1.0"})
SCOPE = InstrumentationScope(name="zerver", version="0.1.0")


def make_spans(n: int) -> list[SpanData]:
    out = []
    for i in range(n):
        out.append(
            SpanData(
                name="db.get blog_post",
                trace_id=(0x5B8EFFF798038103D269B633813F0000 + i // 6) or 1,
                span_id=0x0EE19B7EC3C10000 + i + 1,
                parent_span_id=0x0EE19B7EC3C00000 + i // 6 + 1,
                kind=SpanKind.CLIENT,
                start_ns=T0 + i * 1000,
                end_ns=T0 + i * 1000 + 250_000,
                attributes={
                    "db.system": "sqlite",
                    "db.operation.name": "get",
                    "db.collection.name": "blog_post",
                    "zerver.effect.key": f"post:{i % 1000}",
                    "job.queue_wait_ms": 0.125,
                    "job.attempts": 1,
                },
                events=[SpanEvent("zerver.job.enqueued", T0 + i * 1000 + 10, {"job.depth": 3})],
                resource=RES,
                scope=SCOPE,
            )
        )
    return out


def to_sdk(spans: list[SpanData]) -> list[ReadableSpan]:
    res = SdkResource(dict(RES.attributes))
    scope = SdkScope(SCOPE.name, SCOPE.version)
    return [span_to_readable(s, resource=res, scope=scope) for s in spans]


def best_us_per_span(fn: Callable[[], object], n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / n * 1e6


# -- encoders -------------------------------------------------------------------------


def _av(v: object) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, str):
        return {"stringValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    return {"doubleValue": v}


def dict_orjson(spans: list[SpanData]) -> bytes:
    """The obvious alternative to a hand-written writer, for scale."""
    return orjson.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [
                            {"key": k, "value": _av(v)} for k, v in RES.attributes.items()
                        ]
                    },
                    "scopeSpans": [
                        {
                            "scope": {"name": SCOPE.name, "version": SCOPE.version},
                            "spans": [
                                {
                                    "traceId": f"{s.trace_id:032x}",
                                    "spanId": f"{s.span_id:016x}",
                                    "parentSpanId": f"{s.parent_span_id:016x}",
                                    "flags": s.flags,
                                    "name": s.name,
                                    "kind": s.kind,
                                    "startTimeUnixNano": str(s.start_ns),
                                    "endTimeUnixNano": str(s.end_ns),
                                    "attributes": [
                                        {"key": k, "value": _av(v)} for k, v in s.attributes.items()
                                    ],
                                    "events": [
                                        {
                                            "timeUnixNano": str(etime),
                                            "name": ename,
                                            "attributes": [
                                                {"key": k, "value": _av(v)}
                                                for k, v in eattrs.items()
                                            ],
                                        }
                                        for ename, etime, eattrs, _ in s.events
                                    ],
                                    "status": {},
                                }
                                for s in spans
                            ],
                        }
                    ],
                }
            ]
        }
    )


def bench_encode(repeat: int) -> dict[str, float]:
    spans = make_spans(512)
    sdk = to_sdk(spans)
    json_enc = JsonEncoder()
    pb_enc = ProtobufEncoder()
    wire_enc = ProtobufWireEncoder()
    json_enc.encode(spans)  # warm the caches as a running pipeline would have them
    wire_enc.encode(spans)
    n = len(spans)
    return {
        "zerver JSON": best_us_per_span(lambda: json_enc.encode(spans), n, repeat * 5),
        "zerver protobuf (wire writer)": best_us_per_span(
            lambda: wire_enc.encode(spans), n, repeat * 5
        ),
        "zerver protobuf (official messages)": best_us_per_span(
            lambda: pb_enc.encode(spans), n, repeat
        ),
        "official protobuf": best_us_per_span(
            lambda: encode_spans(sdk).SerializeToString(), n, repeat
        ),
        "dict + orjson": best_us_per_span(lambda: dict_orjson(spans), n, repeat * 5),
        "pickle (to a process)": best_us_per_span(lambda: pickle.dumps(spans, 5), n, repeat * 5),
    }


# -- submit ---------------------------------------------------------------------------


class _NullSdkExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def bench_submit(n: int, repeat: int) -> dict[str, float]:
    spans = make_spans(n)
    sdk = to_sdk(spans)
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeat):
        pipeline = ExportPipeline(
            NoopExporter(), max_queue_size=n, max_export_batch_size=512, schedule_delay_s=60
        )
        submit = pipeline.submit
        start = time.perf_counter()
        for s in spans:
            submit(s)
        ours.append(time.perf_counter() - start)
        pipeline.shutdown(30)

        bsp = BatchSpanProcessor(
            _NullSdkExporter(),
            max_queue_size=n,
            max_export_batch_size=512,
            schedule_delay_millis=60_000,
        )
        on_end = bsp.on_end
        start = time.perf_counter()
        for r in sdk:
            on_end(r)
        theirs.append(time.perf_counter() - start)
        bsp.shutdown()  # type: ignore[no-untyped-call]
    return {
        "zerver ExportPipeline.submit": min(ours) / n * 1e6,
        "SDK BatchSpanProcessor.on_end": min(theirs) / n * 1e6,
    }


# -- end to end -----------------------------------------------------------------------


def _receiver_process(conn: Connection) -> None:
    """Serve OTLP/HTTP in a child process: the collector is another process in real life,
    and decoding there must not compete with the measured exporter for the GIL.

    Every contender talks to this same receiver, which fully decodes each request
    (orjson for JSON, the upb protobuf parser for protobuf) to count its spans.
    It also reports its own CPU time, so the bench can tell when the receiver,
    not the exporter, is the bottleneck (busy ≈ 100 % of one core).
    """
    # The receiver stands in for a collector (Go, in real life): it should cost as
    # little as possible so the exporters are what is measured. Decoded requests
    # are acyclic and freed by reference counting; the cyclic GC would only walk
    # the ~40 containers orjson builds per JSON span (~25 % of decoding). Protobuf
    # decoding (upb) builds no Python containers, so this changes nothing for it.
    gc.disable()
    receiver = OtlpReceiver(keep_bodies=False).start()
    try:
        while True:
            command, n = conn.recv()
            if command == "new":
                receiver.stop()
                receiver = OtlpReceiver(keep_bodies=False).start()
                conn.send(receiver.endpoint)
            elif command == "wait":
                conn.send(receiver.wait_for_spans(n, 300))
            elif command == "cpu":
                conn.send(time.process_time())
            else:
                return
    finally:
        receiver.stop()


class RemoteReceiver:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_receiver_process, args=(child,), daemon=True)
        self._process.start()

    def new(self) -> str:
        self._conn.send(("new", 0))
        return str(self._conn.recv())

    def wait_for_spans(self, n: int) -> bool:
        self._conn.send(("wait", n))
        return bool(self._conn.recv())

    def cpu(self) -> float:
        """The receiver process's CPU seconds so far."""
        self._conn.send(("cpu", 0))
        return float(self._conn.recv())

    def close(self) -> None:
        self._conn.send(("stop", 0))
        self._process.join(10)


@dataclass
class Run:
    """One end-to-end run: throughput and where the CPU went."""

    spans_per_s: float
    exporter_cpu_us: float
    """CPU µs per span of this (exporting) process, all threads."""
    receiver_cpu_us: float
    """CPU µs per span of the receiver process."""
    receiver_busy: float
    """Receiver CPU seconds per wall second: near 1.0, the receiver is the bottleneck."""


def _timed_run(
    receiver: RemoteReceiver,
    n: int,
    start_export: Callable[[str], Callable[[], None]],
    who: str,
) -> Run:
    """Start a contender (it submits ``n`` spans), wait until all arrived, measure."""
    endpoint = receiver.new()
    rx0 = receiver.cpu()
    cpu0 = time.process_time()
    start = time.perf_counter()
    stop = start_export(endpoint)
    ok = receiver.wait_for_spans(n)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    rx = receiver.cpu() - rx0
    stop()
    if not ok:
        raise RuntimeError(f"{who}: not every span arrived")
    return Run(n / elapsed, cpu / n * 1e6, rx / n * 1e6, rx / elapsed)


def zerver_exporting(
    endpoint: str,
    spans: list[SpanData],
    protocol: str,
    encode_ahead: int = 1,
    *,
    wire: bool = False,
) -> ExportPipeline:
    """zerver's side of a run: a pipeline into ``endpoint`` that was handed ``spans``."""
    encoder = ProtobufWireEncoder() if wire else None
    transport = OtlpHttpExporter(endpoint, protocol=protocol, encoder=encoder)
    pipeline = ExportPipeline(
        ResilienceBuilder(transport).retry().build(),
        max_queue_size=len(spans),
        max_export_batch_size=512,
        schedule_delay_s=0.05,
        encode_ahead=encode_ahead,
    )
    for s in spans:
        pipeline.submit(s)
    return pipeline


def sdk_exporting(endpoint: str, sdk: list[ReadableSpan]) -> BatchSpanProcessor:
    """The SDK's side of a run: a ``BatchSpanProcessor`` into ``endpoint`` that ended ``sdk``."""
    bsp = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint),
        max_queue_size=len(sdk),
        max_export_batch_size=512,
        schedule_delay_millis=50,
    )
    for r in sdk:
        bsp.on_end(r)
    return bsp


def e2e_zerver(
    receiver: RemoteReceiver,
    spans: list[SpanData],
    protocol: str,
    encode_ahead: int = 1,
    *,
    wire: bool = False,
) -> Run:
    def start(endpoint: str) -> Callable[[], None]:
        pipeline = zerver_exporting(endpoint, spans, protocol, encode_ahead, wire=wire)

        def stop() -> None:
            pipeline.shutdown(30)

        return stop

    return _timed_run(receiver, len(spans), start, "zerver")


def e2e_sdk(receiver: RemoteReceiver, sdk: list[ReadableSpan]) -> Run:
    def start(endpoint: str) -> Callable[[], None]:
        return sdk_exporting(endpoint, sdk).shutdown

    return _timed_run(receiver, len(sdk), start, "SDK")


SDK_E2E = "SDK BatchSpanProcessor + OTLPSpanExporter"


def bench_e2e(n: int, repeat: int) -> dict[str, list[Run]]:
    """Every contender once per round, the order rotated each round, against one
    receiver process: machine noise hits all of them alike, and each round's
    ratios compare runs made seconds apart."""
    spans = make_spans(n)
    sdk = to_sdk(spans)
    contenders: dict[str, Callable[[RemoteReceiver], Run]] = {
        "zerver pipeline, http/json": lambda r: e2e_zerver(r, spans, "http/json"),
        "zerver pipeline, http/protobuf": lambda r: e2e_zerver(r, spans, "http/protobuf"),
        "zerver http/protobuf, ProtobufWireEncoder": lambda r: e2e_zerver(
            r, spans, "http/protobuf", wire=True
        ),
        "zerver http/json, one worker (encode_ahead=0)": lambda r: e2e_zerver(
            r, spans, "http/json", encode_ahead=0
        ),
        SDK_E2E: lambda r: e2e_sdk(r, sdk),
    }
    runs: dict[str, list[Run]] = {name: [] for name in contenders}
    names = list(contenders)
    receiver = RemoteReceiver()
    try:
        e2e_zerver(receiver, spans[:5000], "http/json")  # warm up imports and caches
        for round_ in range(repeat):
            k = round_ % len(names)
            for name in names[k:] + names[:k]:
                gc.collect()
                runs[name].append(contenders[name](receiver))
    finally:
        receiver.close()
    return runs


def print_e2e(runs: dict[str, list[Run]]) -> None:
    peer = runs[SDK_E2E]
    med = statistics.median
    print(
        f"  {'':<47} {'spans/s':>9} {'ratio':>6}  {'cpu µs':>6} {'rx µs':>6} {'rx busy':>7}  runs"
    )
    for name, rs in runs.items():
        # the ratio is taken per round (same round = same machine state), then the median
        ratio = med(r.spans_per_s / p.spans_per_s for r, p in zip(rs, peer, strict=True))
        print(
            f"  {name:<47} {med(r.spans_per_s for r in rs):>9,.0f} x{ratio:>5.2f}  "
            f"{med(r.exporter_cpu_us for r in rs):>6.1f} "
            f"{med(r.receiver_cpu_us for r in rs):>6.1f} "
            f"{med(r.receiver_busy for r in rs):>7.2f}  "
            + " ".join(f"{r.spans_per_s / 1000:,.0f}k" for r in rs)
        )
    print(
        "  (medians; ratio = median of per-round ratios vs the SDK; cpu µs / rx µs = CPU\n"
        "   per span in the exporting / receiving process; rx busy = receiver CPU per wall s)"
    )


# -- event-loop interference ----------------------------------------------------------


@dataclass
class LoopLag:
    """How late a 1 ms ``asyncio.sleep`` wakes up while something else runs."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    ticks: int
    spans_per_s: float


async def _tick_until(wait: Callable[[], object]) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    done = loop.run_in_executor(None, wait)
    lateness = []
    while not done.done():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        lateness.append(time.perf_counter() - t0 - 0.001)
    await done
    return lateness, time.perf_counter() - start


def _lag(lateness: list[float], n: int, elapsed: float) -> LoopLag:
    q = statistics.quantiles(lateness, n=100)
    return LoopLag(q[49] * 1e3, q[98] * 1e3, max(lateness) * 1e3, len(lateness), n / elapsed)


def bench_loop(n: int, repeat: int) -> dict[str, list[LoopLag]]:
    """An asyncio loop on the main thread ticks every 1 ms while the exporter (a
    background thread of this process) drains ``n`` already-submitted spans into the
    receiver process; the loop's lateness is what request handling would feel."""
    spans = make_spans(n)
    sdk = to_sdk(spans)
    receiver = RemoteReceiver()

    def idle() -> LoopLag:
        lateness, elapsed = asyncio.run(_tick_until(lambda: time.sleep(1.0)))
        return _lag(lateness, 0, elapsed)

    def zerver(protocol: str) -> LoopLag:
        pipeline = zerver_exporting(receiver.new(), spans, protocol)
        lateness, elapsed = asyncio.run(_tick_until(lambda: receiver.wait_for_spans(n)))
        pipeline.shutdown(30)
        return _lag(lateness, n, elapsed)

    def otel_sdk() -> LoopLag:
        bsp = sdk_exporting(receiver.new(), sdk)
        lateness, elapsed = asyncio.run(_tick_until(lambda: receiver.wait_for_spans(n)))
        bsp.shutdown()  # type: ignore[no-untyped-call]
        return _lag(lateness, n, elapsed)

    scenarios: dict[str, Callable[[], LoopLag]] = {
        "idle (nothing exporting)": idle,
        "zerver pipeline, http/json": lambda: zerver("http/json"),
        "zerver pipeline, http/protobuf": lambda: zerver("http/protobuf"),
        SDK_E2E: otel_sdk,
    }
    out: dict[str, list[LoopLag]] = {name: [] for name in scenarios}
    try:
        for _ in range(repeat):
            for name, run in scenarios.items():
                gc.collect()
                out[name].append(run())
    finally:
        receiver.close()
    return out


def print_loop(lags: dict[str, list[LoopLag]]) -> None:
    print(f"  {'':<47} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'spans/s':>9}")
    for name, ls in lags.items():
        med = statistics.median
        rate = med(x.spans_per_s for x in ls)
        print(
            f"  {name:<47} {med(x.p50_ms for x in ls):>7.2f} {med(x.p99_ms for x in ls):>7.2f} "
            f"{med(x.max_ms for x in ls):>7.2f} {f'{rate:,.0f}' if rate else '-':>9}"
        )
    print("  (lateness of a 1 ms asyncio.sleep on the main thread; medians over runs)")


# -- transport ------------------------------------------------------------------------


def bench_transport(posts: int) -> dict[str, float]:
    body = JsonEncoder().encode(make_spans(64))
    headers = {"Content-Type": "application/json"}
    with OtlpReceiver() as receiver:
        conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as OtlpHttpExporter does
        start = time.perf_counter()
        for _ in range(posts):
            conn.request("POST", "/v1/traces", body, headers)
            conn.getresponse().read()
        stdlib = (time.perf_counter() - start) / posts * 1e6
        conn.close()
        with httpx.Client() as client:
            start = time.perf_counter()
            for _ in range(posts):
                client.post(receiver.endpoint, content=body, headers=headers).read()
            via_httpx = (time.perf_counter() - start) / posts * 1e6
    return {"http.client POST": stdlib, "httpx.Client POST": via_httpx}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=100_000, help="spans for submit and e2e")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only",
        default="encode,submit,e2e,loop,transport",
        help="comma-separated sections to run (encode, submit, e2e, loop, transport)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for this process (default: the interpreter's 0.005 s)",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    def table(
        title: str, rows: dict[str, float], unit: str, *, higher_is_better: bool = False
    ) -> None:
        print(f"\n{title}")
        peer = next(v for k, v in rows.items() if k.startswith(("official", "SDK")))
        for name, value in rows.items():
            ratio = value / peer if higher_is_better else peer / value
            print(f"  {name:<45} {value:>12,.2f} {unit:<8} x{ratio:,.1f} vs peer")

    if "encode" in only:
        table(
            "encode (µs per span, best of runs, 512-span batches)",
            bench_encode(args.repeat),
            "µs/span",
        )
    if "submit" in only:
        table(
            f"submit from the request path (µs per span, {args.spans:,} spans)",
            bench_submit(args.spans, args.repeat),
            "µs/span",
        )
    if "e2e" in only:
        print(
            f"\nend to end into a local OTLP/HTTP receiver ({args.spans:,} spans, "
            f"{args.repeat} rounds, same receiver process, order rotated per round)"
        )
        print_e2e(bench_e2e(args.spans, args.repeat))
    if "loop" in only:
        print(f"\nevent-loop interference while exporting {args.spans:,} spans")
        print_loop(bench_loop(args.spans, args.repeat))
    if "transport" in only:
        transport = bench_transport(300)
        print("\ntransport (µs per POST of a 64-span JSON body, kept-alive connection)")
        for name, value in transport.items():
            print(f"  {name:<45} {value:>12,.1f} µs")


if __name__ == "__main__":
    main()
