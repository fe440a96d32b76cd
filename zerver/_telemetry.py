"""Wiring an app's telemetry from the standard environment.

``OTEL_TRACES_EXPORTER`` (``otlp`` by default, ``console``, ``none``, or a
comma-separated list) and the ``OTEL_EXPORTER_OTLP_*`` / ``OTEL_BSP_*`` /
``ZER_VER_EXPORT_*`` variables choose where spans go; one export pipeline
carries both zerver's spans and the spans user code makes through the
OpenTelemetry API (an SDK ``TracerProvider`` is installed for them unless the
application installed its own). ``OTEL_METRICS_EXPORTER`` (``otlp`` or
``console``; unset is none) adds the request metrics, recorded from the same
records where the traces are built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, cast

import structlog

from zerver.core._errors import ConfigError

# The export pipeline, the exporter process and the OpenTelemetry SDK load when
# tracing starts (in setup_tracing), not when zerver is imported.
if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from zerver.export._config import MetricsExportConfig
    from zerver.trace._offload import ProcessTraceSubscriber
    from zerver.trace._tracing import TraceEngine

    from ._app import App
    from ._config import Settings
    from .export import ExportPipeline

__all__ = ["default_spool_dir", "in_exporter_process", "metrics_config", "setup_tracing"]

_log = structlog.get_logger("zerver.export")


def default_spool_dir(service: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Where ``zerver run`` spools a service's traces unless told otherwise:
    ``$XDG_STATE_HOME/zerver/spool/<service>`` (``~/.local/state`` when unset).

    None, with a warning, if that directory cannot be made (a read-only home): the
    service then runs without a spool rather than not at all.
    """
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", service).strip("._") or "app"
    path = os.path.join(base, "zerver", "spool", name)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        _log.warning(
            "no trace spool: its default directory cannot be made; set "
            "ZER_VER_EXPORT_SPOOL_DIR to keep traces through backend outages",
            spool=path,
            error=exc.strerror,
        )
        return None
    return path


def in_exporter_process(settings: Settings) -> bool:
    """Whether traces are built in an exporter process (``ZER_VER_EXPORT_PROCESS``:
    ``on``, or ``auto`` on a machine with more than one core)."""
    mode = settings.export_process
    return mode == "on" or (mode == "auto" and (os.cpu_count() or 1) > 1)


def _warn_unused_priority(env: Mapping[str, str]) -> None:
    """``ZER_VER_EXPORT_PRIORITY`` is the exporter process's: say so when there is none."""
    if any(name.upper() == "ZER_VER_EXPORT_PRIORITY" for name in env):
        _log.warning(
            "ZER_VER_EXPORT_PRIORITY ignored: no exporter process builds traces here "
            "(see ZER_VER_EXPORT_PROCESS and OTEL_TRACES_EXPORTER)"
        )


def setup_tracing(
    app: App, environ: Mapping[str, str] | None = None, *, default_spool_dir: str | None = None
) -> TraceEngine | ProcessTraceSubscriber | None:
    """Trace ``app`` to the exporters the environment names; ``None`` when tracing is off.

    With ``ZER_VER_EXPORT_PROCESS=on`` (or ``auto`` on a machine with more than
    one core) spans are built and exported in a separate exporter process.
    ``default_spool_dir``: the spool directory unless ``ZER_VER_EXPORT_SPOOL_DIR``
    says otherwise. Raises :class:`~zerver.ConfigError` naming the first invalid
    variable.
    """
    from zerver.export._sinks import InMemorySpanSink, PipelineSink
    from zerver.trace._offload import records_item_spans
    from zerver.trace._tracing import engine_from_settings

    from .export import ExportConfig, ExportPipeline

    env = os.environ if environ is None else environ
    config = ExportConfig.from_env(env, default_spool_dir=default_spool_dir)
    metrics = metrics_config(env)
    tracing = bool(config.exporters) and config.exporters != ("none",)
    in_child = tracing and in_exporter_process(app.settings)
    if not in_child:
        _warn_unused_priority(env)
    if not tracing:
        if metrics is not None:
            raise ConfigError(
                "OTEL_METRICS_EXPORTER: metrics are recorded where traces are built, and "
                "OTEL_TRACES_EXPORTER=none builds none; for metrics without traces keep a "
                "traces exporter and set OTEL_TRACES_SAMPLER=always_off"
            )
        return None
    spooling = config.spool_dir is not None and config.exporters == ("otlp",)
    _log.info(
        "trace export",
        exporters=",".join(config.exporters),
        endpoint=config.endpoint if "otlp" in config.exporters else None,
        built_in="exporter process" if in_child else "this process",
        spool=config.spool_dir if spooling else "off",
        spool_max_mb=config.spool_max_bytes // 2**20 if spooling else None,
    )
    if metrics is not None:
        _log.info(
            "metrics export",
            exporter=metrics.exporter,
            endpoint=metrics.endpoint if metrics.exporter == "otlp" else None,
            interval_s=metrics.interval_s,
            temporality=metrics.temporality,
        )
    if in_child:
        # The exporter process may use any core, even if this one is pinned.
        sub = app.trace_in_process(env, default_spool_dir=default_spool_dir, metrics=metrics)
        # User spans (rare) then use a pipeline of their own in this process; the
        # exporter process replays what it spools.
        _install_user_span_provider(
            app,
            sub.spec.resource,
            lambda: ExportPipeline.from_config(config, replay=False),
            owns=True,
        )
        return sub
    # Records an exporter process spooled (an earlier run) are rebuilt by an engine of
    # the pipeline's own: the app's engine belongs to the event loop's thread.
    replayer: list[TraceEngine] = []
    pipeline = ExportPipeline.from_config(
        config, rebuild=lambda item: records_item_spans(replayer[0], item)
    )
    sink = PipelineSink(pipeline, drain_timeout_s=app.settings.shutdown_timeout_s)
    engine = app.trace_to(sink)
    replayer.append(
        engine_from_settings(
            app.settings,
            InMemorySpanSink(),
            resource=engine.resource,
            interpreters=app.interpreters,
        )
    )
    if metrics is not None:
        from zerver.trace._metrics_worker import MetricsWorker

        worker = MetricsWorker.from_config(
            metrics,
            engine.resource.attributes,
            semconv_mode=app.settings.semconv_mode,
            export=config,
            pipeline_stats=pipeline.stats,
        )
        worker.active = app.count_active_requests()
        # Subscribed after the engine: it sees each record's final sampling decision.
        app.subscribe(worker)
    # User spans leave through the same pipeline, which the sink shuts down.
    _install_user_span_provider(app, engine.resource.attributes, lambda: pipeline, owns=False)
    return engine


def metrics_config(environ: Mapping[str, str]) -> MetricsExportConfig | None:
    """The server's metrics export, or ``None``: metrics are exported when
    ``OTEL_METRICS_EXPORTER`` names an exporter (``otlp`` or ``console``).

    Unset means none, unlike the OpenTelemetry SDKs' ``otlp`` default: a server
    started without a collector in mind does not send metrics to one.
    """
    from zerver.export._config import MetricsExportConfig

    if environ.get("OTEL_METRICS_EXPORTER", "none").strip().lower() == "none":
        return None
    return MetricsExportConfig.from_env(environ)


def _install_user_span_provider(
    app: App,
    resource: Mapping[str, object],
    pipeline: Callable[[], ExportPipeline],
    *,
    owns: bool,
) -> None:
    """Send spans made through the OpenTelemetry API to ``pipeline()``, unless the
    application installed a tracer provider of its own. ``owns``: the provider shuts
    the pipeline down when the app stops."""
    from opentelemetry import trace as otel_trace

    if not isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider):
        return
    from opentelemetry.sdk.resources import Resource as OtelResource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.util.types import AttributeValue

    from .export import ZerverSpanProcessor

    attrs = cast(Mapping[str, AttributeValue], resource)
    provider = TracerProvider(resource=OtelResource.create(dict(attrs)))
    provider.add_span_processor(ZerverSpanProcessor(pipeline(), shutdown_pipeline=owns))
    otel_trace.set_tracer_provider(provider)
    if owns:
        app.subscribe(_ProviderCloser(provider))


class _ProviderCloser:
    """Shuts the user-span provider (and its pipeline) down with the app."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def on_request_end(self, record: object) -> None:
        return None

    def shutdown(self) -> None:
        self.provider.shutdown()
