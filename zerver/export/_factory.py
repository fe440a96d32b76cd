"""Build the exporter chain that :class:`ExportConfig` describes."""

from __future__ import annotations

from zerver._sinks import ConsoleSpanSink
from zerver.export._base import BatchExporter
from zerver.export._config import ExportConfig
from zerver.export._resilience import ResilienceBuilder
from zerver.export._simple import FanOutExporter, NoopExporter
from zerver.export._transport import OtlpHttpExporter

__all__ = ["build_exporter"]


def build_exporter(config: ExportConfig, *, retry: bool = True) -> BatchExporter:
    """``otlp`` → resilient OTLP/HTTP; ``console`` → :class:`~zerver.ConsoleSpanSink`
    (``layout="lines"``); none → no-op.

    ``retry=False`` leaves the retry layer out (a pipeline with a spool retries by
    replaying what it spooled).
    """
    exporters: list[BatchExporter] = []
    for name in config.exporters:
        if name == "otlp":
            transport = OtlpHttpExporter.from_config(config)
            builder = ResilienceBuilder.from_config(transport, config, retry=retry)
            exporters.append(builder.build())
        else:
            exporters.append(ConsoleSpanSink(layout="lines"))
    if not exporters:
        return NoopExporter()
    if len(exporters) == 1:
        return exporters[0]
    return FanOutExporter(exporters[0], *exporters[1:])
