"""Build the exporter chain that :class:`ExportConfig` describes."""

from __future__ import annotations

from zerver.export._base import BatchExporter
from zerver.export._config import ExportConfig
from zerver.export._resilience import ResilienceBuilder
from zerver.export._simple import ConsoleExporter, FanOutExporter, NoopExporter
from zerver.export._transport import OtlpHttpExporter

__all__ = ["build_exporter"]


def build_exporter(config: ExportConfig) -> BatchExporter:
    """``otlp`` → resilient OTLP/HTTP; ``console`` → :class:`ConsoleExporter`; none → no-op."""
    exporters: list[BatchExporter] = []
    for name in config.exporters:
        if name == "otlp":
            transport = OtlpHttpExporter.from_config(config)
            exporters.append(ResilienceBuilder.from_config(transport, config).build())
        else:
            exporters.append(ConsoleExporter())
    if not exporters:
        return NoopExporter()
    if len(exporters) == 1:
        return exporters[0]
    return FanOutExporter(exporters[0], *exporters[1:])
