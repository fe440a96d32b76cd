"""zerver: an async HTTP/1.1 web framework whose observability is the architecture.

Handlers are pipelines of pure steps; all I/O is requested as effects and run
by a reactor job system whose every lifecycle transition is recorded.
"""

from ._app import App
from ._clock import Clock, MonotonicClock, VirtualClock
from ._config import Settings, load_settings
from ._decisions import Continue, Decision, Done, Fail, Join, Mode, Need
from ._effects import (
    CacheDel,
    CacheGet,
    CacheSet,
    DbDel,
    DbGet,
    DbPut,
    DbQuery,
    Effect,
    HttpDelete,
    HttpGet,
    HttpPost,
    HttpPut,
    HttpResult,
    RetryPolicy,
)
from ._errors import (
    ConfigError,
    EffectError,
    MissingSlotError,
    PeerError,
    QueueFullError,
    UnsupportedEffectError,
    UsageError,
    ZerverError,
)
from ._http import Request, Response
from ._interpreters import CacheInterpreter, CacheStats, HttpInterpreter, SqliteInterpreter
from ._logging import AccessLog, add_trace_context, configure_logging
from ._messaging import (
    Broker,
    BrokerInterpreter,
    Consumer,
    ConsumerStats,
    MemoryBroker,
    Message,
    Publish,
)
from ._offload import ProcessTraceSubscriber
from ._park import ConcurrencyLimiter, Interpreter, JobContext, RateLimiter
from ._promotion import JobDurations, durations
from ._records import (
    JobState,
    NeedRecord,
    ParkEpisode,
    RequestRecord,
    RetryRecord,
    SlotWrite,
    StepRecord,
    Subscriber,
)
from ._server import ServerApp, ServerConfig, run, serve
from ._sinks import ConsoleSpanSink, InMemorySpanSink
from ._slots import Context, Slot
from ._spans import (
    InstrumentationScope,
    Resource,
    SpanData,
    SpanEvent,
    SpanKind,
    SpanLink,
    StatusCode,
)
from ._steps import Step, step
from ._telemetry import PipelineSink, setup_tracing
from ._tracing import SpanSink, TraceEngine
from ._version import __version__

__all__ = [
    "AccessLog",
    "App",
    "Broker",
    "BrokerInterpreter",
    "CacheDel",
    "CacheGet",
    "CacheInterpreter",
    "CacheSet",
    "CacheStats",
    "Clock",
    "ConcurrencyLimiter",
    "ConfigError",
    "ConsoleSpanSink",
    "Consumer",
    "ConsumerStats",
    "Context",
    "Continue",
    "DbDel",
    "DbGet",
    "DbPut",
    "DbQuery",
    "Decision",
    "Done",
    "Effect",
    "EffectError",
    "Fail",
    "HttpDelete",
    "HttpGet",
    "HttpInterpreter",
    "HttpPost",
    "HttpPut",
    "HttpResult",
    "InMemorySpanSink",
    "InstrumentationScope",
    "Interpreter",
    "JobContext",
    "JobDurations",
    "JobState",
    "Join",
    "MemoryBroker",
    "Message",
    "MissingSlotError",
    "Mode",
    "MonotonicClock",
    "Need",
    "NeedRecord",
    "ParkEpisode",
    "PeerError",
    "PipelineSink",
    "ProcessTraceSubscriber",
    "Publish",
    "QueueFullError",
    "RateLimiter",
    "Request",
    "RequestRecord",
    "Resource",
    "Response",
    "RetryPolicy",
    "RetryRecord",
    "ServerApp",
    "ServerConfig",
    "Settings",
    "Slot",
    "SlotWrite",
    "SpanData",
    "SpanEvent",
    "SpanKind",
    "SpanLink",
    "SpanSink",
    "SqliteInterpreter",
    "StatusCode",
    "Step",
    "StepRecord",
    "Subscriber",
    "TraceEngine",
    "UnsupportedEffectError",
    "UsageError",
    "VirtualClock",
    "ZerverError",
    "__version__",
    "add_trace_context",
    "configure_logging",
    "durations",
    "load_settings",
    "run",
    "serve",
    "setup_tracing",
    "step",
]
