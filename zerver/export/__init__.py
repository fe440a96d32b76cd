"""zerver's span export pipeline: OTLP/HTTP (JSON by default, or protobuf),
bounded buffering, batching, retry, circuit breaker, rate limit, drain.

Typical use::

    from zerver.export import ExportConfig, ExportPipeline

    pipeline = ExportPipeline.from_config(ExportConfig.from_env())
    pipeline.submit(span)       # request path: cheap, never raises
    pipeline.shutdown(5.0)      # drain within 5 s

See docs/exporting.md.

This package also owns the span model (``_spans``: what the trace engine
produces) and the one span-sink protocol (``_sinks``). It may import
:mod:`zerver.core` and ``zerver._config``, nothing above (docs/architecture.md).
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from zerver._lazy import install as _install

if _TYPE_CHECKING:
    from zerver.core._clock import TokenBucket as TokenBucket

    from ._base import BatchExporter as BatchExporter
    from ._base import BodyTransport as BodyTransport
    from ._base import DropReason as DropReason
    from ._base import ExportContext as ExportContext
    from ._base import ExportResult as ExportResult
    from ._base import ExportStatus as ExportStatus
    from ._base import RealTimer as RealTimer
    from ._base import SpanEncoder as SpanEncoder
    from ._base import Timer as Timer
    from ._config import ExportConfig as ExportConfig
    from ._config import MetricsExportConfig as MetricsExportConfig
    from ._config import Overflow as Overflow
    from ._config import tls_context as tls_context
    from ._factory import build_exporter as build_exporter
    from ._json import JsonEncoder as JsonEncoder
    from ._metrics_exporter import OtlpMetricExporter as OtlpMetricExporter
    from ._metrics_exporter import meter_provider as meter_provider
    from ._otel import ZerverSpanExporter as ZerverSpanExporter
    from ._otel import ZerverSpanProcessor as ZerverSpanProcessor
    from ._otel import span_from_readable as span_from_readable
    from ._otel import span_to_readable as span_to_readable
    from ._pipeline import ExportPipeline as ExportPipeline
    from ._pipeline import ExportStats as ExportStats
    from ._pipeline import ShutdownReport as ShutdownReport
    from ._protobuf import ProtobufEncoder as ProtobufEncoder
    from ._protowire import ProtobufWireEncoder as ProtobufWireEncoder
    from ._receiver import OtlpReceiver as OtlpReceiver
    from ._receiver import ReceivedRequest as ReceivedRequest
    from ._receiver import Reply as Reply
    from ._receiver import attributes_of as attributes_of
    from ._resilience import BreakerState as BreakerState
    from ._resilience import CircuitBreaker as CircuitBreaker
    from ._resilience import CircuitBreakerExporter as CircuitBreakerExporter
    from ._resilience import RateLimitedExporter as RateLimitedExporter
    from ._resilience import ResilienceBuilder as ResilienceBuilder
    from ._resilience import RetryingExporter as RetryingExporter
    from ._resilience import RetryPolicy as RetryPolicy
    from ._simple import ConsoleExporter as ConsoleExporter
    from ._simple import FanOutExporter as FanOutExporter
    from ._simple import InMemoryExporter as InMemoryExporter
    from ._simple import NoopExporter as NoopExporter
    from ._spans import InstrumentationScope as InstrumentationScope
    from ._spans import Resource as Resource
    from ._spans import SpanData as SpanData
    from ._spans import SpanEvent as SpanEvent
    from ._spans import SpanKind as SpanKind
    from ._spans import SpanLink as SpanLink
    from ._spans import StatusCode as StatusCode
    from ._spool import Spool as Spool
    from ._spool import SpoolItem as SpoolItem
    from ._spool import SpoolStats as SpoolStats
    from ._transport import OtlpHttpExporter as OtlpHttpExporter
    from ._transport import parse_partial_success as parse_partial_success
    from ._transport import parse_retry_after as parse_retry_after

__all__ = [
    "BatchExporter",
    "BodyTransport",
    "BreakerState",
    "CircuitBreaker",
    "CircuitBreakerExporter",
    "ConsoleExporter",
    "DropReason",
    "ExportConfig",
    "ExportContext",
    "ExportPipeline",
    "ExportResult",
    "ExportStats",
    "ExportStatus",
    "FanOutExporter",
    "InMemoryExporter",
    "InstrumentationScope",
    "JsonEncoder",
    "MetricsExportConfig",
    "NoopExporter",
    "OtlpHttpExporter",
    "OtlpMetricExporter",
    "OtlpReceiver",
    "Overflow",
    "ProtobufEncoder",
    "ProtobufWireEncoder",
    "RateLimitedExporter",
    "RealTimer",
    "ReceivedRequest",
    "Reply",
    "ResilienceBuilder",
    "Resource",
    "RetryPolicy",
    "RetryingExporter",
    "ShutdownReport",
    "SpanData",
    "SpanEncoder",
    "SpanEvent",
    "SpanKind",
    "SpanLink",
    "Spool",
    "SpoolItem",
    "SpoolStats",
    "StatusCode",
    "Timer",
    "TokenBucket",
    "ZerverSpanExporter",
    "ZerverSpanProcessor",
    "attributes_of",
    "build_exporter",
    "meter_provider",
    "parse_partial_success",
    "parse_retry_after",
    "span_from_readable",
    "span_to_readable",
    "tls_context",
]

# Imported on first use (see ``zerver._lazy``).
_LAZY = {
    "SpanData": "._spans",
    "SpanEvent": "._spans",
    "SpanLink": "._spans",
    "SpanKind": "._spans",
    "StatusCode": "._spans",
    "Resource": "._spans",
    "InstrumentationScope": "._spans",
    "BatchExporter": "._base",
    "BodyTransport": "._base",
    "BreakerState": "._resilience",
    "CircuitBreaker": "._resilience",
    "CircuitBreakerExporter": "._resilience",
    "ConsoleExporter": "._simple",
    "DropReason": "._base",
    "ExportConfig": "._config",
    "ExportContext": "._base",
    "ExportPipeline": "._pipeline",
    "ExportResult": "._base",
    "ExportStats": "._pipeline",
    "ExportStatus": "._base",
    "FanOutExporter": "._simple",
    "InMemoryExporter": "._simple",
    "JsonEncoder": "._json",
    "MetricsExportConfig": "._config",
    "NoopExporter": "._simple",
    "OtlpHttpExporter": "._transport",
    "OtlpMetricExporter": "._metrics_exporter",
    "OtlpReceiver": "._receiver",
    "Overflow": "._config",
    "ProtobufEncoder": "._protobuf",
    "ProtobufWireEncoder": "._protowire",
    "RateLimitedExporter": "._resilience",
    "RealTimer": "._base",
    "ReceivedRequest": "._receiver",
    "Reply": "._receiver",
    "ResilienceBuilder": "._resilience",
    "RetryPolicy": "._resilience",
    "RetryingExporter": "._resilience",
    "ShutdownReport": "._pipeline",
    "SpanEncoder": "._base",
    "Spool": "._spool",
    "SpoolItem": "._spool",
    "SpoolStats": "._spool",
    "Timer": "._base",
    "TokenBucket": "zerver.core._clock",
    "ZerverSpanExporter": "._otel",
    "ZerverSpanProcessor": "._otel",
    "attributes_of": "._receiver",
    "build_exporter": "._factory",
    "meter_provider": "._metrics_exporter",
    "parse_partial_success": "._transport",
    "parse_retry_after": "._transport",
    "span_from_readable": "._otel",
    "span_to_readable": "._otel",
    "tls_context": "._config",
}

if not _TYPE_CHECKING:
    __getattr__, __dir__ = _install(__name__, _LAZY)
