"""``python -m loadtest [--quick] [--only NAME ...] [--duration S] [--rounds N] [--out DIR]``.

Exit status: 0 when every contender served requests and no zerver contender
lost spans; 1 otherwise (never because of timings); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._contenders import CONTENDERS, SHARED, by_name
from ._runner import RunConfig, format_table, run_all, write_results, write_svg


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(c.name for c in CONTENDERS)
    shared = ", ".join(c.name for c in SHARED)
    p = argparse.ArgumentParser(
        prog="python -m loadtest", description="zerver against its peers, side by side."
    )
    p.add_argument("--quick", action="store_true", help="2 s per load, 1 s warm-up (CI smoke)")
    p.add_argument(
        "--only",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help=f"run only these contenders: {names}; or, never run unless named here, the "
        f"blog route on PostgreSQL and Redis servers started for each: {shared}",
    )
    p.add_argument("--duration", type=float, help="seconds of measured load per path (10; quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per path (2; quick 1)")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections (64)")
    p.add_argument(
        "--max-requests",
        type=int,
        default=1_000_000,
        help="request bound of each measured load (1000000)",
    )
    p.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator: wrk when installed (auto), or the Python one",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every contender this many times, in turn; ratios are the rounds' medians (1)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("loadtest/results"),
        help="directory for JSON results, logs and the chart (loadtest/results)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        contenders = by_name(args.only)
    except ValueError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if (
        duration <= 0
        or warmup < 0
        or args.connections < 1
        or args.max_requests < 1
        or args.rounds < 1
    ):
        print(
            "loadtest: --duration, --connections, --max-requests and --rounds must be "
            "positive, --warmup not negative",
            file=sys.stderr,
        )
        return 2
    cfg = RunConfig(
        duration_s=duration,
        warmup_s=warmup,
        connections=args.connections,
        max_requests=args.max_requests,
        loadgen=args.loadgen,
        pin=not args.no_pin,
        out=args.out.resolve(),
        rounds=args.rounds,
        quick=args.quick,
    )
    report = run_all(contenders, cfg)
    path = write_results(report, cfg.out)
    chart = write_svg(report, path.with_suffix(".svg"))
    print()
    print(format_table(report))
    print()
    cfg_line = ", ".join(f"{k}={v}" for k, v in report.config.items())
    print(
        f"config: {cfg_line}; load average {report.machine['loadavg_before']} before, "
        f"{report.machine['loadavg_after']} after; {report.elapsed_s:g} s"
    )
    print(f"results: {path}\nchart: {chart}")
    for c in report.contenders:
        for note in c.notes:
            print(f"note: {c.name}: {note}")
        for line in c.log_problems:
            print(f"server log ({c.name}): {line}")
    if not report.ok:
        for problem in report.problems:
            print(f"FAIL {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
