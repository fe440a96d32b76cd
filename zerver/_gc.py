"""The cyclic garbage collector of zerver's long-running processes.

What a request allocates, and what the exporter process allocates for it
(records, spans, encoded batches), is freed by reference counting: zerver's
own objects leave no cycles (tests/test_no_cycles.py). Python's default, a
young collection per 700 net new containers, then only walks what is in
flight or queued, finds it alive and promotes it to the older generations,
whose full passes walk everything promoted since: under load about a tenth
of the server's time and a fifth of the exporter process's
(docs/performance.md, "The garbage collector under load"). So each process
freezes what it built at start-up, which lives as long as the process, out of
the collector, and collects rarely; cycles, if any, are still collected.
"""

from __future__ import annotations

import gc

__all__ = ["EXPORTER_THRESHOLDS", "tune_gc"]

EXPORTER_THRESHOLDS = (100_000, 50, 50)
"""The exporter process's thresholds: tens of thousands of spans wait in its queues."""


def tune_gc(*thresholds: int) -> None:
    """Freeze what exists now out of the collector, then set its ``thresholds``
    (as ``gc.set_threshold``: the first, optionally the older generations')."""
    gc.freeze()
    gc.set_threshold(*thresholds)
