"""zerver's load test: zerver against its peers, side by side, with tracing on.

``python -m loadtest [--quick] [--only NAME ...]`` runs every contender in turn
(see :mod:`loadtest._contenders`), prints a table, and saves JSON and an SVG
chart under ``loadtest/results/``. See docs/performance.md.
"""

from ._contenders import CONTENDERS, Contender, Workload
from ._loadgen import LoadResult, LoadSpec, run_load, run_python_load
from ._receiver import SpanReceiver, SpanTally, TallySnapshot
from ._runner import (
    ContenderResult,
    Report,
    RunConfig,
    WorkloadResult,
    format_table,
    run_all,
    write_results,
    write_svg,
)

__all__ = [
    "CONTENDERS",
    "Contender",
    "ContenderResult",
    "LoadResult",
    "LoadSpec",
    "Report",
    "RunConfig",
    "SpanReceiver",
    "SpanTally",
    "TallySnapshot",
    "Workload",
    "WorkloadResult",
    "format_table",
    "run_all",
    "run_load",
    "run_python_load",
    "write_results",
    "write_svg",
]
