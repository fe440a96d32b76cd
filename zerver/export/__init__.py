"""zerver's span export pipeline: OTLP/HTTP (JSON by default, or protobuf),
bounded buffering, batching, retry, circuit breaker, rate limit, drain.

Typical use::

    from zerver.export import ExportConfig, ExportPipeline

    pipeline = ExportPipeline.from_config(ExportConfig.from_env())
    pipeline.submit(span)       # request path: cheap, never raises
    pipeline.shutdown(5.0)      # drain within 5 s

See docs/exporting.md.
"""

from zerver.export._base import (
    BatchExporter,
    BodyTransport,
    DropReason,
    ExportContext,
    ExportResult,
    ExportStatus,
    RealTimer,
    SpanEncoder,
    Timer,
)
from zerver.export._config import ExportConfig, Overflow, tls_context
from zerver.export._factory import build_exporter
from zerver.export._json import JsonEncoder
from zerver.export._otel import (
    ZerverSpanExporter,
    ZerverSpanProcessor,
    span_from_readable,
    span_to_readable,
)
from zerver.export._pipeline import ExportPipeline, ExportStats, ShutdownReport
from zerver.export._protobuf import ProtobufEncoder
from zerver.export._protowire import ProtobufWireEncoder
from zerver.export._receiver import OtlpReceiver, ReceivedRequest, Reply, attributes_of
from zerver.export._resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitBreakerExporter,
    RateLimitedExporter,
    ResilienceBuilder,
    RetryingExporter,
    RetryPolicy,
    TokenBucket,
)
from zerver.export._simple import ConsoleExporter, FanOutExporter, InMemoryExporter, NoopExporter
from zerver.export._spool import Spool, SpoolItem, SpoolStats
from zerver.export._transport import OtlpHttpExporter, parse_partial_success, parse_retry_after

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
    "JsonEncoder",
    "NoopExporter",
    "OtlpHttpExporter",
    "OtlpReceiver",
    "Overflow",
    "ProtobufEncoder",
    "ProtobufWireEncoder",
    "RateLimitedExporter",
    "RealTimer",
    "ReceivedRequest",
    "Reply",
    "ResilienceBuilder",
    "RetryPolicy",
    "RetryingExporter",
    "ShutdownReport",
    "SpanEncoder",
    "Spool",
    "SpoolItem",
    "SpoolStats",
    "Timer",
    "TokenBucket",
    "ZerverSpanExporter",
    "ZerverSpanProcessor",
    "attributes_of",
    "build_exporter",
    "parse_partial_success",
    "parse_retry_after",
    "span_from_readable",
    "span_to_readable",
    "tls_context",
]
