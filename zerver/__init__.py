"""zerver: an async HTTP/1.1 web framework whose observability is the architecture.

Handlers are pipelines of pure steps; all I/O is requested as effects and run
by a reactor job system whose every lifecycle transition is recorded.

The public names below are imported on first use (see ``zerver._lazy``): ``import
zerver`` loads none of the runtime, and tracing's OpenTelemetry SDK and export
pipeline load only when tracing starts.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._lazy import install as _install
from ._version import __version__

if _TYPE_CHECKING:
    from zerver.core._clock import Clock as Clock
    from zerver.core._clock import MonotonicClock as MonotonicClock
    from zerver.core._clock import VirtualClock as VirtualClock
    from zerver.core._decisions import Continue as Continue
    from zerver.core._decisions import Decision as Decision
    from zerver.core._decisions import Done as Done
    from zerver.core._decisions import Fail as Fail
    from zerver.core._decisions import Join as Join
    from zerver.core._decisions import Mode as Mode
    from zerver.core._decisions import Need as Need
    from zerver.core._effects import CacheDel as CacheDel
    from zerver.core._effects import CacheGet as CacheGet
    from zerver.core._effects import CacheSet as CacheSet
    from zerver.core._effects import DbDel as DbDel
    from zerver.core._effects import DbGet as DbGet
    from zerver.core._effects import DbPut as DbPut
    from zerver.core._effects import DbQuery as DbQuery
    from zerver.core._effects import Effect as Effect
    from zerver.core._effects import HttpDelete as HttpDelete
    from zerver.core._effects import HttpGet as HttpGet
    from zerver.core._effects import HttpPost as HttpPost
    from zerver.core._effects import HttpPut as HttpPut
    from zerver.core._effects import HttpResult as HttpResult
    from zerver.core._effects import RetryPolicy as RetryPolicy
    from zerver.core._errors import ConfigError as ConfigError
    from zerver.core._errors import EffectError as EffectError
    from zerver.core._errors import MissingSlotError as MissingSlotError
    from zerver.core._errors import PeerError as PeerError
    from zerver.core._errors import QueueFullError as QueueFullError
    from zerver.core._errors import UnsupportedEffectError as UnsupportedEffectError
    from zerver.core._errors import UsageError as UsageError
    from zerver.core._errors import ZerverError as ZerverError
    from zerver.core._http import Request as Request
    from zerver.core._http import Response as Response
    from zerver.core._message import Message as Message
    from zerver.core._slots import Context as Context
    from zerver.core._slots import Slot as Slot
    from zerver.core._steps import Step as Step
    from zerver.core._steps import step as step
    from zerver.export._sinks import ConsoleSpanSink as ConsoleSpanSink
    from zerver.export._sinks import InMemorySpanSink as InMemorySpanSink
    from zerver.export._sinks import PipelineSink as PipelineSink
    from zerver.export._sinks import SpanSink as SpanSink
    from zerver.http._server import ServerApp as ServerApp
    from zerver.http._server import ServerConfig as ServerConfig
    from zerver.http._server import run as run
    from zerver.http._server import serve as serve
    from zerver.runtime._messaging import Broker as Broker
    from zerver.runtime._messaging import BrokerInterpreter as BrokerInterpreter
    from zerver.runtime._messaging import Consumer as Consumer
    from zerver.runtime._messaging import ConsumerStats as ConsumerStats
    from zerver.runtime._messaging import MemoryBroker as MemoryBroker
    from zerver.runtime._messaging import Publish as Publish
    from zerver.runtime._park import ConcurrencyLimiter as ConcurrencyLimiter
    from zerver.runtime._park import Interpreter as Interpreter
    from zerver.runtime._park import JobContext as JobContext
    from zerver.runtime._park import RateLimiter as RateLimiter
    from zerver.runtime.interpreters._cache import CacheInterpreter as CacheInterpreter
    from zerver.runtime.interpreters._cache import CacheStats as CacheStats
    from zerver.runtime.interpreters._httpclient import HttpInterpreter as HttpInterpreter
    from zerver.runtime.interpreters._sqlite import SqliteInterpreter as SqliteInterpreter
    from zerver.trace._logging import AccessLog as AccessLog
    from zerver.trace._logging import add_trace_context as add_trace_context
    from zerver.trace._logging import configure_logging as configure_logging
    from zerver.trace._metrics import RecordMetrics as RecordMetrics

    from ._app import App as App
    from ._config import Settings as Settings
    from ._config import load_settings as load_settings
    from ._telemetry import setup_tracing as setup_tracing

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
    "Interpreter",
    "JobContext",
    "Join",
    "MemoryBroker",
    "Message",
    "MissingSlotError",
    "Mode",
    "MonotonicClock",
    "Need",
    "PeerError",
    "PipelineSink",
    "Publish",
    "QueueFullError",
    "RateLimiter",
    "RecordMetrics",
    "Request",
    "Response",
    "RetryPolicy",
    "ServerApp",
    "ServerConfig",
    "Settings",
    "Slot",
    "SpanSink",
    "SqliteInterpreter",
    "Step",
    "UnsupportedEffectError",
    "UsageError",
    "VirtualClock",
    "ZerverError",
    "__version__",
    "add_trace_context",
    "configure_logging",
    "load_settings",
    "run",
    "serve",
    "setup_tracing",
    "step",
]

_LAZY = {
    "AccessLog": ".trace._logging",
    "App": "._app",
    "Broker": ".runtime._messaging",
    "BrokerInterpreter": ".runtime._messaging",
    "CacheDel": ".core._effects",
    "CacheGet": ".core._effects",
    "CacheInterpreter": ".runtime.interpreters._cache",
    "CacheSet": ".core._effects",
    "CacheStats": ".runtime.interpreters._cache",
    "Clock": ".core._clock",
    "ConcurrencyLimiter": ".runtime._park",
    "ConfigError": ".core._errors",
    "ConsoleSpanSink": ".export._sinks",
    "Consumer": ".runtime._messaging",
    "ConsumerStats": ".runtime._messaging",
    "Context": ".core._slots",
    "Continue": ".core._decisions",
    "DbDel": ".core._effects",
    "DbGet": ".core._effects",
    "DbPut": ".core._effects",
    "DbQuery": ".core._effects",
    "Decision": ".core._decisions",
    "Done": ".core._decisions",
    "Effect": ".core._effects",
    "EffectError": ".core._errors",
    "Fail": ".core._decisions",
    "HttpDelete": ".core._effects",
    "HttpGet": ".core._effects",
    "HttpInterpreter": ".runtime.interpreters._httpclient",
    "HttpPost": ".core._effects",
    "HttpPut": ".core._effects",
    "HttpResult": ".core._effects",
    "InMemorySpanSink": ".export._sinks",
    "Interpreter": ".runtime._park",
    "JobContext": ".runtime._park",
    "Join": ".core._decisions",
    "MemoryBroker": ".runtime._messaging",
    "Message": ".core._message",
    "MissingSlotError": ".core._errors",
    "Mode": ".core._decisions",
    "MonotonicClock": ".core._clock",
    "Need": ".core._decisions",
    "PeerError": ".core._errors",
    "PipelineSink": ".export._sinks",
    "RecordMetrics": ".trace._metrics",
    "Publish": ".runtime._messaging",
    "QueueFullError": ".core._errors",
    "RateLimiter": ".runtime._park",
    "Request": ".core._http",
    "Response": ".core._http",
    "RetryPolicy": ".core._effects",
    "ServerApp": ".http._server",
    "ServerConfig": ".http._server",
    "Settings": "._config",
    "Slot": ".core._slots",
    "SpanSink": ".export._sinks",
    "SqliteInterpreter": ".runtime.interpreters._sqlite",
    "Step": ".core._steps",
    "UnsupportedEffectError": ".core._errors",
    "UsageError": ".core._errors",
    "VirtualClock": ".core._clock",
    "ZerverError": ".core._errors",
    "add_trace_context": ".trace._logging",
    "configure_logging": ".trace._logging",
    "load_settings": "._config",
    "run": ".http._server",
    "serve": ".http._server",
    "setup_tracing": "._telemetry",
    "step": ".core._steps",
}

# Names that moved to the subpackage that owns them; still answered, with a warning.
_MOVED = {
    "JobState": "zerver.trace",
    "NeedRecord": "zerver.trace",
    "ParkEpisode": "zerver.trace",
    "RequestRecord": "zerver.trace",
    "RetryRecord": "zerver.trace",
    "SlotWrite": "zerver.trace",
    "StepRecord": "zerver.trace",
    "Subscriber": "zerver.trace",
    "TraceEngine": "zerver.trace",
    "JobDurations": "zerver.trace",
    "durations": "zerver.trace",
    "ProcessTraceSubscriber": "zerver.trace",
    "SpanData": "zerver.export",
    "SpanEvent": "zerver.export",
    "SpanLink": "zerver.export",
    "SpanKind": "zerver.export",
    "StatusCode": "zerver.export",
    "Resource": "zerver.export",
    "InstrumentationScope": "zerver.export",
}

if not _TYPE_CHECKING:
    __getattr__, __dir__ = _install(__name__, _LAZY, _MOVED)
