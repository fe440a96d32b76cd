"""Build the exporter chain that :class:`ExportConfig` describes."""

from __future__ import annotations

from ._base import BatchExporter
from ._config import ExportConfig
from ._resilience import ResilienceBuilder
from ._simple import (
    ConsoleFormat,
    ConsoleTraceExporter,
    FanOutExporter,
    NoopExporter,
    console_format_from_env,
)
from ._transport import OtlpHttpExporter

__all__ = ["build_exporter"]


def build_exporter(
    config: ExportConfig, *, retry: bool = True, console_format: ConsoleFormat | None = None
) -> BatchExporter:
    """``otlp`` → resilient OTLP/HTTP; ``console`` → :class:`ConsoleTraceExporter`
    on standard output; none → no-op.

    ``console_format``: ``tree`` (each trace as an indented tree) or ``jsonl``
    (one JSON object per span); ``None`` reads ``ZER_VER_CONSOLE_FORMAT``.
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
            fmt = console_format if console_format is not None else console_format_from_env()
            exporters.append(ConsoleTraceExporter(format=fmt))
    if not exporters:
        return NoopExporter()
    if len(exporters) == 1:
        return exporters[0]
    return FanOutExporter(exporters[0], *exporters[1:])
