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
    from ._app import App as App
    from ._clock import Clock as Clock
    from ._clock import MonotonicClock as MonotonicClock
    from ._clock import VirtualClock as VirtualClock
    from ._config import Settings as Settings
    from ._config import load_settings as load_settings
    from ._decisions import Continue as Continue
    from ._decisions import Decision as Decision
    from ._decisions import Done as Done
    from ._decisions import Fail as Fail
    from ._decisions import Join as Join
    from ._decisions import Mode as Mode
    from ._decisions import Need as Need
    from ._effects import CacheDel as CacheDel
    from ._effects import CacheGet as CacheGet
    from ._effects import CacheSet as CacheSet
    from ._effects import DbDel as DbDel
    from ._effects import DbGet as DbGet
    from ._effects import DbPut as DbPut
    from ._effects import DbQuery as DbQuery
    from ._effects import Effect as Effect
    from ._effects import HttpDelete as HttpDelete
    from ._effects import HttpGet as HttpGet
    from ._effects import HttpPost as HttpPost
    from ._effects import HttpPut as HttpPut
    from ._effects import HttpResult as HttpResult
    from ._effects import RetryPolicy as RetryPolicy
    from ._errors import ConfigError as ConfigError
    from ._errors import EffectError as EffectError
    from ._errors import MissingSlotError as MissingSlotError
    from ._errors import PeerError as PeerError
    from ._errors import QueueFullError as QueueFullError
    from ._errors import UnsupportedEffectError as UnsupportedEffectError
    from ._errors import UsageError as UsageError
    from ._errors import ZerverError as ZerverError
    from ._http import Request as Request
    from ._http import Response as Response
    from ._interpreters import CacheInterpreter as CacheInterpreter
    from ._interpreters import CacheStats as CacheStats
    from ._interpreters import HttpInterpreter as HttpInterpreter
    from ._interpreters import SqliteInterpreter as SqliteInterpreter
    from ._logging import AccessLog as AccessLog
    from ._logging import add_trace_context as add_trace_context
    from ._logging import configure_logging as configure_logging
    from ._messaging import Broker as Broker
    from ._messaging import BrokerInterpreter as BrokerInterpreter
    from ._messaging import Consumer as Consumer
    from ._messaging import ConsumerStats as ConsumerStats
    from ._messaging import MemoryBroker as MemoryBroker
    from ._messaging import Message as Message
    from ._messaging import Publish as Publish
    from ._metrics import RecordMetrics as RecordMetrics
    from ._offload import ProcessTraceSubscriber as ProcessTraceSubscriber
    from ._park import ConcurrencyLimiter as ConcurrencyLimiter
    from ._park import Interpreter as Interpreter
    from ._park import JobContext as JobContext
    from ._park import RateLimiter as RateLimiter
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
    from ._server import ServerApp as ServerApp
    from ._server import ServerConfig as ServerConfig
    from ._server import run as run
    from ._server import serve as serve
    from ._sinks import ConsoleSpanSink as ConsoleSpanSink
    from ._sinks import InMemorySpanSink as InMemorySpanSink
    from ._slots import Context as Context
    from ._slots import Slot as Slot
    from ._spans import InstrumentationScope as InstrumentationScope
    from ._spans import Resource as Resource
    from ._spans import SpanData as SpanData
    from ._spans import SpanEvent as SpanEvent
    from ._spans import SpanKind as SpanKind
    from ._spans import SpanLink as SpanLink
    from ._spans import StatusCode as StatusCode
    from ._steps import Step as Step
    from ._steps import step as step
    from ._telemetry import PipelineSink as PipelineSink
    from ._telemetry import setup_tracing as setup_tracing
    from ._tracing import SpanSink as SpanSink
    from ._tracing import TraceEngine as TraceEngine

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
    "RecordMetrics",
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

_LAZY = {
    "AccessLog": "._logging",
    "App": "._app",
    "Broker": "._messaging",
    "BrokerInterpreter": "._messaging",
    "CacheDel": "._effects",
    "CacheGet": "._effects",
    "CacheInterpreter": "._interpreters",
    "CacheSet": "._effects",
    "CacheStats": "._interpreters",
    "Clock": "._clock",
    "ConcurrencyLimiter": "._park",
    "ConfigError": "._errors",
    "ConsoleSpanSink": "._sinks",
    "Consumer": "._messaging",
    "ConsumerStats": "._messaging",
    "Context": "._slots",
    "Continue": "._decisions",
    "DbDel": "._effects",
    "DbGet": "._effects",
    "DbPut": "._effects",
    "DbQuery": "._effects",
    "Decision": "._decisions",
    "Done": "._decisions",
    "Effect": "._effects",
    "EffectError": "._errors",
    "Fail": "._decisions",
    "HttpDelete": "._effects",
    "HttpGet": "._effects",
    "HttpInterpreter": "._interpreters",
    "HttpPost": "._effects",
    "HttpPut": "._effects",
    "HttpResult": "._effects",
    "InMemorySpanSink": "._sinks",
    "InstrumentationScope": "._spans",
    "Interpreter": "._park",
    "JobContext": "._park",
    "JobDurations": "._promotion",
    "JobState": "._records",
    "Join": "._decisions",
    "MemoryBroker": "._messaging",
    "Message": "._messaging",
    "MissingSlotError": "._errors",
    "Mode": "._decisions",
    "MonotonicClock": "._clock",
    "Need": "._decisions",
    "NeedRecord": "._records",
    "ParkEpisode": "._records",
    "PeerError": "._errors",
    "PipelineSink": "._telemetry",
    "ProcessTraceSubscriber": "._offload",
    "RecordMetrics": "._metrics",
    "Publish": "._messaging",
    "QueueFullError": "._errors",
    "RateLimiter": "._park",
    "Request": "._http",
    "RequestRecord": "._records",
    "Resource": "._spans",
    "Response": "._http",
    "RetryPolicy": "._effects",
    "RetryRecord": "._records",
    "ServerApp": "._server",
    "ServerConfig": "._server",
    "Settings": "._config",
    "Slot": "._slots",
    "SlotWrite": "._records",
    "SpanData": "._spans",
    "SpanEvent": "._spans",
    "SpanKind": "._spans",
    "SpanLink": "._spans",
    "SpanSink": "._tracing",
    "SqliteInterpreter": "._interpreters",
    "StatusCode": "._spans",
    "Step": "._steps",
    "StepRecord": "._records",
    "Subscriber": "._records",
    "TraceEngine": "._tracing",
    "UnsupportedEffectError": "._errors",
    "UsageError": "._errors",
    "VirtualClock": "._clock",
    "ZerverError": "._errors",
    "add_trace_context": "._logging",
    "configure_logging": "._logging",
    "durations": "._promotion",
    "load_settings": "._config",
    "run": "._server",
    "serve": "._server",
    "setup_tracing": "._telemetry",
    "step": "._steps",
}

if not _TYPE_CHECKING:
    __getattr__, __dir__ = _install(__name__, _LAZY)
