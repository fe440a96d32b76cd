"""Wiring an app's telemetry from the standard environment.

``OTEL_TRACES_EXPORTER`` (``otlp`` by default, ``console``, ``none``, or a
comma-separated list) and the ``OTEL_EXPORTER_OTLP_*`` / ``OTEL_BSP_*`` /
``ZER_VER_EXPORT_*`` variables choose where spans go; one export pipeline
carries both zerver's spans and the spans user code makes through the
OpenTelemetry API (an SDK ``TracerProvider`` is installed for them unless the
application installed its own).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import Resource as OtelResource
from opentelemetry.sdk.trace import TracerProvider

from ._app import App
from ._spans import SpanData
from ._tracing import TraceEngine

__all__ = ["PipelineSink", "setup_tracing"]


class PipelineSink:
    """A :class:`~zerver.SpanSink` that hands spans to an export pipeline.

    ``export`` is a bounded-buffer append per span (no I/O); ``shutdown``
    drains the pipeline within ``drain_timeout_s``.
    """

    def __init__(self, pipeline: object, *, drain_timeout_s: float = 10.0) -> None:
        from .export import ExportPipeline

        assert isinstance(pipeline, ExportPipeline)
        self.pipeline = pipeline
        self._submit = pipeline.submit
        self.drain_timeout_s = drain_timeout_s

    def export(self, spans: list[SpanData]) -> None:
        submit = self._submit
        for span in spans:
            submit(span)

    def shutdown(self) -> None:
        self.pipeline.shutdown(self.drain_timeout_s)


def setup_tracing(app: App, environ: Mapping[str, str] | None = None) -> TraceEngine | None:
    """Trace ``app`` to the exporters the environment names; ``None`` when tracing is off.

    Raises :class:`~zerver.ConfigError` naming the first invalid variable.
    """
    from .export import ExportConfig, ExportPipeline, ZerverSpanProcessor

    env = os.environ if environ is None else environ
    config = ExportConfig.from_env(env)
    if not config.exporters or config.exporters == ("none",):
        return None
    pipeline = ExportPipeline.from_config(config)
    sink = PipelineSink(pipeline, drain_timeout_s=app.settings.shutdown_timeout_s)
    engine = app.trace_to(sink)
    # User spans made through the OpenTelemetry API leave through the same pipeline.
    if isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider):
        provider = TracerProvider(resource=OtelResource.create(dict(engine.resource.attributes)))
        provider.add_span_processor(ZerverSpanProcessor(pipeline, shutdown_pipeline=False))
        otel_trace.set_tracer_provider(provider)
    return engine
