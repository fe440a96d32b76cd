"""From records to telemetry: the request and job records (one schema), the
promotion engine, the trace builder and its semantic conventions,
propagation, sampling, metrics, logging's correlation, and the exporter
process that does this work off the request path.

Public here (each loaded on first use): the records a subscriber receives
(``RequestRecord`` and what it holds), the ``Subscriber`` protocol, the derived
job durations, the trace engine and the exporter-process subscriber. What an
app author needs lives in :mod:`zerver`.

May import: :mod:`zerver.core`, :mod:`zerver.export`, ``zerver._config``;
never the runtime, the HTTP shell or the app.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from zerver._lazy import install as _install

if _TYPE_CHECKING:
    from ._offload import ProcessTraceSubscriber as ProcessTraceSubscriber
    from ._promotion import JobDurations as JobDurations
    from ._promotion import durations as durations
    from ._records import JobState as JobState
    from ._records import NeedRecord as NeedRecord
    from ._records import ParkEpisode as ParkEpisode
    from ._records import RequestRecord as RequestRecord
    from ._records import RetryRecord as RetryRecord
    from ._records import SlotWrite as SlotWrite
    from ._records import StepRecord as StepRecord
    from ._records import Subscriber as Subscriber
    from ._tracing import TraceEngine as TraceEngine

_LAZY = {
    "JobState": "._records",
    "NeedRecord": "._records",
    "ParkEpisode": "._records",
    "RequestRecord": "._records",
    "RetryRecord": "._records",
    "SlotWrite": "._records",
    "StepRecord": "._records",
    "Subscriber": "._records",
    "JobDurations": "._promotion",
    "durations": "._promotion",
    "TraceEngine": "._tracing",
    "ProcessTraceSubscriber": "._offload",
}

__all__ = [
    "JobDurations",
    "JobState",
    "NeedRecord",
    "ParkEpisode",
    "ProcessTraceSubscriber",
    "RequestRecord",
    "RetryRecord",
    "SlotWrite",
    "StepRecord",
    "Subscriber",
    "TraceEngine",
    "durations",
]

if not _TYPE_CHECKING:
    __getattr__, __dir__ = _install(__name__, _LAZY)
