"""Benchmark: zerver's export pipeline against the OpenTelemetry SDK, same spans, same run.

Measures, on realistic CLIENT spans (6 attributes, one event):

- encode µs/span: zerver's OTLP/JSON writer and protobuf encoder vs the official
  ``opentelemetry.exporter.otlp.proto.common`` encoder (+ ``SerializeToString``);
  a hand-built dict + ``orjson.dumps`` and ``pickle`` (the cost of handing a
  span to another process) for scale;
- submit µs/span: ``ExportPipeline.submit`` vs the SDK ``BatchSpanProcessor.on_end``;
- end-to-end spans/s into a local OTLP/HTTP receiver: zerver pipeline (JSON and
  protobuf) vs ``BatchSpanProcessor`` + the official ``OTLPSpanExporter`` (protobuf);
- one POST on a kept-alive connection: stdlib ``http.client`` vs ``httpx``.

The end-to-end receiver runs in a child process, as a collector would.

Run: ``python loadtest/bench_export.py [--spans 100000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import pickle
import socket
import time
from collections.abc import Callable
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

from zerver._spans import InstrumentationScope, Resource, SpanData, SpanEvent, SpanKind
from zerver.export import (
    ExportPipeline,
    JsonEncoder,
    NoopExporter,
    OtlpHttpExporter,
    OtlpReceiver,
    ProtobufEncoder,
    ResilienceBuilder,
    span_to_readable,
)

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
                                            "timeUnixNano": str(e.time_ns),
                                            "name": e.name,
                                            "attributes": [
                                                {"key": k, "value": _av(v)}
                                                for k, v in e.attributes.items()
                                            ],
                                        }
                                        for e in s.events
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
    json_enc.encode(spans)  # warm the caches as a running pipeline would have them
    n = len(spans)
    return {
        "zerver JSON": best_us_per_span(lambda: json_enc.encode(spans), n, repeat * 5),
        "zerver protobuf": best_us_per_span(lambda: pb_enc.encode(spans), n, repeat),
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
    and decoding there must not compete with the measured exporter for the GIL."""
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

    def close(self) -> None:
        self._conn.send(("stop", 0))
        self._process.join(10)


def e2e_zerver(receiver: RemoteReceiver, spans: list[SpanData], protocol: str) -> float:
    endpoint = receiver.new()
    exporter = ResilienceBuilder(OtlpHttpExporter(endpoint, protocol=protocol)).retry().build()
    pipeline = ExportPipeline(
        exporter, max_queue_size=len(spans), max_export_batch_size=512, schedule_delay_s=0.05
    )
    start = time.perf_counter()
    for s in spans:
        pipeline.submit(s)
    ok = receiver.wait_for_spans(len(spans))
    elapsed = time.perf_counter() - start
    pipeline.shutdown(30)
    if not ok:
        raise RuntimeError("zerver: not every span arrived")
    return len(spans) / elapsed


def e2e_sdk(receiver: RemoteReceiver, sdk: list[ReadableSpan]) -> float:
    endpoint = receiver.new()
    bsp = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint),
        max_queue_size=len(sdk),
        max_export_batch_size=512,
        schedule_delay_millis=50,
    )
    start = time.perf_counter()
    for r in sdk:
        bsp.on_end(r)
    ok = receiver.wait_for_spans(len(sdk))
    elapsed = time.perf_counter() - start
    bsp.shutdown()  # type: ignore[no-untyped-call]
    if not ok:
        raise RuntimeError("SDK: not every span arrived")
    return len(sdk) / elapsed


def bench_e2e(n: int, repeat: int) -> dict[str, float]:
    spans = make_spans(n)
    sdk = to_sdk(spans)
    receiver = RemoteReceiver()
    try:
        return {
            "zerver pipeline, http/json": max(
                e2e_zerver(receiver, spans, "http/json") for _ in range(repeat)
            ),
            "zerver pipeline, http/protobuf": max(
                e2e_zerver(receiver, spans, "http/protobuf") for _ in range(repeat)
            ),
            "SDK BatchSpanProcessor + OTLPSpanExporter": max(
                e2e_sdk(receiver, sdk) for _ in range(repeat)
            ),
        }
    finally:
        receiver.close()


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
    args = parser.parse_args()

    def table(
        title: str, rows: dict[str, float], unit: str, *, higher_is_better: bool = False
    ) -> None:
        print(f"\n{title}")
        peer = next(v for k, v in rows.items() if k.startswith(("official", "SDK")))
        for name, value in rows.items():
            ratio = value / peer if higher_is_better else peer / value
            print(f"  {name:<45} {value:>12,.2f} {unit:<8} x{ratio:,.1f} vs peer")

    table(
        "encode (µs per span, best of runs, 512-span batches)", bench_encode(args.repeat), "µs/span"
    )
    table(
        f"submit from the request path (µs per span, {args.spans:,} spans)",
        bench_submit(args.spans, args.repeat),
        "µs/span",
    )
    table(
        f"end to end into a local OTLP/HTTP receiver ({args.spans:,} spans, best of runs)",
        bench_e2e(args.spans, args.repeat),
        "spans/s",
        higher_is_better=True,
    )
    transport = bench_transport(300)
    print("\ntransport (µs per POST of a 64-span JSON body, kept-alive connection)")
    for name, value in transport.items():
        print(f"  {name:<45} {value:>12,.1f} µs")


if __name__ == "__main__":
    main()
