"""Benchmark: what the exporter process does for one traced blog request, part by part.

The load test's blog route puts zerver's exporter process on the core wrk and
the span receiver use, so every instruction it spends per request is taken
from the load generator. This records real happy-path requests of the demo
(``GET /blogs/posts/{id}``, as ``bench_trace.py`` does: fake interpreters,
the DB park varying so about one build in sixteen promotes it), hands them
over as the server does (``handover_bytes``: pack and marshal), and times,
per record:

- ``handover``: what the server's request path pays (pack + marshal);
- ``unpack``: ``marshal.loads`` and ``unpack_record`` in the exporter process;
- ``build``: ``TraceEngine.build`` of the unpacked record;
- ``encode``: OTLP/JSON encoding of the spans, in batches of 512 spans
  (the pipeline's default), per record;
- ``receive``: what the load test's receiver spends per record on such
  batches (``loadtest._receiver``: count and tally);
- ``receive-parse``: the same with the whole body parsed (``orjson``), as the
  receiver does with a body its scan declines.

With ``--instructions`` each part runs under ``valgrind --tool=callgrind``
(instrumentation switched on around the measured loop only), which counts
machine instructions: a figure that, unlike time on a shared machine, does not
move from run to run.

Run: ``python -m loadtest.bench_exporter [--n 4000] [--only unpack,build]
[--instructions]``.
"""

from __future__ import annotations

import argparse
import gc
import marshal
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable

import anyio

from loadtest.bench_trace import RECORDS, record_happy_paths
from zerver._gc import EXPORTER_THRESHOLDS, tune_gc

__all__ = ["PARTS", "main", "prepare"]

PARTS = ("handover", "unpack", "build", "encode", "receive", "receive-parse")
BATCH = 512


def prepare(n: int) -> dict[str, Callable[[], None]]:
    """One callable per part, each doing that part for ``n`` records."""
    import orjson

    from loadtest._receiver import SpanTally, scan_json_spans
    from zerver.export import JsonEncoder
    from zerver.trace._offload import handover_bytes, unpack_record

    records, engine = anyio.run(record_happy_paths, RECORDS)
    for i in range(4 * len(records)):  # the route's rolling p95s settle
        engine.build(records[i % len(records)])
    blobs = [handover_bytes(records[i % len(records)]) for i in range(n)]
    ids = random.Random(1)
    unpacked = [unpack_record(marshal.loads(b), ids) for b in blobs]
    spans = [s for r in unpacked for s in engine.build(r)]
    batches = [spans[i : i + BATCH] for i in range(0, len(spans), BATCH)]
    encoder = JsonEncoder()
    bodies = [encoder.encode(b) for b in batches]

    def handover() -> None:
        for i in range(n):
            handover_bytes(records[i % RECORDS])

    def unpack() -> None:
        for b in blobs:
            unpack_record(marshal.loads(b), ids)

    def build() -> None:
        for r in unpacked:
            engine.build(r)

    def encode() -> None:
        for b in batches:
            encoder.encode(b)

    def receive() -> None:
        tally = SpanTally()
        for body in bodies:
            rows = scan_json_spans(body)
            assert rows is not None
            tally.add_rows(rows)

    def receive_parse() -> None:
        tally = SpanTally()
        for body in bodies:
            tally.add_json(orjson.loads(body))

    return {
        "handover": handover,
        "unpack": unpack,
        "build": build,
        "encode": encode,
        "receive": receive,
        "receive-parse": receive_parse,
    }


def _like_exporter_process() -> None:
    """The exporter process's collector settings (and the receiver's: it runs with
    the collector off): what was prepared is frozen out of it, collections rare."""
    gc.collect()
    tune_gc(*EXPORTER_THRESHOLDS)


def _callgrind(on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        capture_output=True,
        check=False,
        timeout=120,
    )


def _child(part: str, n: int) -> None:
    """Under callgrind: run ``part`` once to warm up, then once counted."""
    fn = prepare(n)[part]
    _like_exporter_process()
    fn()
    gc.collect()
    _callgrind(True)
    fn()
    _callgrind(False)


def _instructions(part: str, n: int) -> float:
    """Instructions per record of ``part``, counted by callgrind."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "loadtest.bench_exporter",
            "--child",
            part,
            "--n",
            str(n),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    total = 0
    for line in out.stderr.splitlines():
        if "Collected :" in line:
            total = int(line.rsplit(":", 1)[1].strip())
    if not total:
        raise RuntimeError(f"no instruction count from valgrind:\n{out.stderr[-2000:]}")
    return total / n


def _best_us(fn: Callable[[], None], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_exporter", description=__doc__)
    p.add_argument("--n", type=int, default=4000, help="records per part (4000)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per part, best kept (5)")
    p.add_argument("--instructions", action="store_true", help="count instructions with callgrind")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.n)
        return 0
    parts = [x for x in args.only.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        print(f"bench_exporter: unknown part(s) {unknown}; known: {PARTS}", file=sys.stderr)
        return 2
    if args.instructions:
        for part in parts:
            print(f"{part:9} {_instructions(part, args.n) / 1e3:8,.1f} k instructions / record")
        return 0
    fns = prepare(args.n)
    _like_exporter_process()
    for part in parts:
        print(f"{part:9} {_best_us(fns[part], args.n, args.repeat):8.2f} µs / record")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
