"""Wiring an app's telemetry from the standard environment (``OTEL_TRACES_EXPORTER``)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._app import App
from ._errors import ConfigError
from ._sinks import ConsoleSpanSink
from ._tracing import TraceEngine

__all__ = ["setup_tracing"]

_EXPORTERS = ("otlp", "console", "none")


def setup_tracing(app: App, environ: Mapping[str, str] | None = None) -> TraceEngine | None:
    """Trace ``app`` to the exporter ``OTEL_TRACES_EXPORTER`` names (default ``otlp``)."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if name not in _EXPORTERS:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={name!r} is invalid: accepted: {', '.join(_EXPORTERS)}"
        )
    if name == "none":
        return None
    if name == "console":
        return app.trace_to(ConsoleSpanSink())
    return None  # OTLP export arrives with zerver.export
