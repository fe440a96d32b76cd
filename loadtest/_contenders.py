"""The contenders: how each server is started and what it is asked.

Every contender serves ``GET /items/{id}`` (a small JSON body); zerver's and
Starlette's also serve the demo's ``GET /blogs/posts/{id}`` (SQLite and an
in-process cache, the same answer bytes). Each is started as
``<argv> --port P`` on 127.0.0.1 with a clean environment: inherited
``OTEL_*`` and ``ZER_VER_*`` variables are removed and the contender's own set,
so a developer's shell cannot change what is measured.

:data:`SHARED` are the blog route on PostgreSQL and Redis (zerver's demo and a
Starlette peer, each with servers of its own that the runner starts and stops).
They run only when named (``--only``): each needs two servers started for it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

__all__ = ["BLOG", "CONTENDERS", "ITEMS", "SHARED", "Contender", "Workload", "by_name"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    name: str
    path: str
    """The request path the load generator sends."""
    route: str
    """The route template, as traced spans name it (``http.route``)."""


ITEMS = Workload(name="items", path="/items/42", route="/items/{id}")
BLOG = Workload(name="blog", path="/blogs/posts/1", route="/blogs/posts/{id}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Contender:
    name: str
    title: str
    argv: tuple[str, ...]
    """Command without the port; ``--host 127.0.0.1 --port P`` is appended."""
    env: dict[str, str] = field(default_factory=dict)
    """Set on top of the cleaned environment; ``{receiver}`` becomes the receiver's base URL."""
    workloads: tuple[Workload, ...] = (ITEMS,)
    traced: bool = False
    check_spans: bool = False
    """A failure unless every completed request's root SERVER span reached the receiver."""
    metrics: bool = False
    """Exports metrics to ``{metrics}`` (a metrics receiver's URL); a failure unless
    its server-duration histogram counts every completed request."""
    backends: tuple[str, ...] = ()
    """Servers started for this contender alone (``postgresql``, ``redis``), on free
    ports, removed after it; ``{db_url}`` and ``{cache_url}`` in ``env`` become their URLs."""


_PY = sys.executable
_UVICORN = (
    _PY,
    "-m",
    "uvicorn",
    "--http",
    "h11",
    "--loop",
    "asyncio",
    "--workers",
    "1",
    "--log-level",
    "warning",
    "--no-access-log",
)
_ZERVER = (_PY, "-m", "zerver", "run", "loadtest.apps.zerver_app:create_app")
_ZERVER_ENV = {"ZER_VER_ACCESS_LOG": "0"}
_OTLP_ENV = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "{receiver}"}
# Metrics to the metrics receiver, every 5 s (and at shutdown), cumulative.
_METRICS_ENV = {
    "OTEL_METRICS_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "{metrics}",
    "OTEL_METRIC_EXPORT_INTERVAL": "5000",
}
_STARLETTE_OTEL_ENV = {"OTEL_EXPORTER_OTLP_ENDPOINT": "{receiver}", "OTEL_SERVICE_NAME": "loadtest"}


def _zerver_traced(
    name: str, what: str, env: dict[str, str], *, every_trace: bool = False, metrics: bool = False
) -> Contender:
    """zerver exporting OTLP/HTTP JSON to the receiver, with ``env`` on top;
    ``every_trace``: a lost root span fails the run; ``metrics``: metrics too."""
    return Contender(
        name=name,
        title=f"zerver, {what}, OTLP/HTTP JSON",
        argv=_ZERVER,
        env={**_ZERVER_ENV, **_OTLP_ENV, **(_METRICS_ENV if metrics else {}), **env},
        workloads=(ITEMS, BLOG),
        traced=True,
        check_spans=every_trace,
        metrics=metrics,
    )


def _starlette_otel(name: str, what: str, env: dict[str, str], *, metrics: bool) -> Contender:
    """Starlette with the OpenTelemetry SDK (ASGI middleware, BatchSpanProcessor,
    OTLP/HTTP protobuf), ``env`` on top; ``metrics``: the middleware's metrics too,
    through the SDK's MeterProvider and OTLP metric exporter."""
    return Contender(
        name=name,
        title=f"uvicorn (h11) + Starlette + OTel ASGI, {what}, OTLP/HTTP protobuf",
        argv=(*_UVICORN, "--factory", "loadtest.apps.starlette_app:create_traced_app"),
        env={**_STARLETTE_OTEL_ENV, **(_METRICS_ENV if metrics else {}), **env},
        workloads=(ITEMS, BLOG),
        traced=True,
        metrics=metrics,
    )


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        name="starlette",
        title="uvicorn (h11) + Starlette, untraced",
        argv=(*_UVICORN, "loadtest.apps.starlette_app:app"),
        workloads=(ITEMS, BLOG),
    ),
    _starlette_otel("starlette-otel", "BatchSpanProcessor", {}, metrics=False),
    _starlette_otel("starlette-otel-metrics", "every trace, SDK metrics", {}, metrics=True),
    _starlette_otel(
        "starlette-otel-0.1-metrics",
        "traceidratio 0.1, SDK metrics",
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
        metrics=True,
    ),
    Contender(
        name="zerver",
        title="zerver, telemetry off",
        argv=_ZERVER,
        env={**_ZERVER_ENV, "OTEL_TRACES_EXPORTER": "none"},
        workloads=(ITEMS, BLOG),
    ),
    _zerver_traced("zerver-otlp", "default telemetry", {}, every_trace=True),
    _zerver_traced(
        "zerver-otlp-normal",
        "default telemetry, exporter at normal priority (ZER_VER_EXPORT_PRIORITY=normal)",
        {"ZER_VER_EXPORT_PRIORITY": "normal"},
        every_trace=True,
    ),
    _zerver_traced(
        "zerver-head-0.1",
        "ZER_VER_SAMPLER=head:0.1 (a tenth of new traces)",
        {"ZER_VER_SAMPLER": "head:0.1"},
    ),
    _zerver_traced("zerver-metrics", "default telemetry + metrics", {}, metrics=True),
    _zerver_traced(
        "zerver-head-0.1-metrics",
        "ZER_VER_SAMPLER=head:0.1 + metrics",
        {"ZER_VER_SAMPLER": "head:0.1"},
        metrics=True,
    ),
    _zerver_traced(
        "zerver-head-0",
        "ZER_VER_SAMPLER=head:0 (every trace sampled out)",
        {"ZER_VER_SAMPLER": "head:0"},
    ),
    _zerver_traced(
        "zerver-debug-jobs", "ZER_VER_DEBUG_JOBS=1", {"ZER_VER_DEBUG_JOBS": "1"}, every_trace=True
    ),
    Contender(
        name="floor-anyio",
        title="floor: bare h11 on anyio streams, constant answer",
        argv=(_PY, "-m", "loadtest.apps.h11_floor", "--transport", "anyio"),
    ),
    Contender(
        name="floor-protocol",
        title="floor: bare h11 on an asyncio Protocol, constant answer",
        argv=(_PY, "-m", "loadtest.apps.h11_floor", "--transport", "protocol"),
    ),
)


# The demo on PostgreSQL and Redis, as docs/backends.md runs it.
_SHARED_ENV = {
    "ZER_VER_DB_URL": "{db_url}",
    "ZER_VER_CACHE_URL": "{cache_url}",
    "ZER_VER_BROKER_URL": "{cache_url}",
}
_SHARED_BACKENDS = ("postgresql", "redis")
_STARLETTE_SHARED = (*_UVICORN, "--factory")

SHARED: tuple[Contender, ...] = (
    Contender(
        name="starlette-pg-redis",
        title="uvicorn (h11) + Starlette, psycopg pool + redis-py, untraced",
        argv=(*_STARLETTE_SHARED, "loadtest.apps.starlette_shared:create_app"),
        env=_SHARED_ENV,
        workloads=(BLOG,),
        backends=_SHARED_BACKENDS,
    ),
    Contender(
        name="starlette-pg-redis-otel",
        title="uvicorn (h11) + Starlette + OTel ASGI, psycopg pool + redis-py, "
        "BatchSpanProcessor, OTLP/HTTP protobuf",
        argv=(*_STARLETTE_SHARED, "loadtest.apps.starlette_shared:create_traced_app"),
        env={**_STARLETTE_OTEL_ENV, **_SHARED_ENV},
        workloads=(BLOG,),
        traced=True,
        backends=_SHARED_BACKENDS,
    ),
    Contender(
        name="zerver-pg-redis",
        title="zerver demo on PostgreSQL + Redis, telemetry off",
        argv=_ZERVER,
        env={**_ZERVER_ENV, "OTEL_TRACES_EXPORTER": "none", **_SHARED_ENV},
        workloads=(BLOG,),
        backends=_SHARED_BACKENDS,
    ),
    Contender(
        name="zerver-pg-redis-otlp",
        title="zerver demo on PostgreSQL + Redis, default telemetry, OTLP/HTTP JSON",
        argv=_ZERVER,
        env={**_ZERVER_ENV, **_OTLP_ENV, **_SHARED_ENV},
        workloads=(BLOG,),
        traced=True,
        check_spans=True,
        backends=_SHARED_BACKENDS,
    ),
)
"""Not in :data:`CONTENDERS`: run them by name (``--only``)."""


def by_name(names: list[str]) -> tuple[Contender, ...]:
    """The contenders named, in their order (:data:`CONTENDERS` when ``names`` is empty;
    :data:`SHARED` only when named); ValueError naming an unknown one."""
    if not names:
        return CONTENDERS
    every = CONTENDERS + SHARED
    known = {c.name for c in every}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown contender {unknown[0]!r}: choose from {', '.join(c.name for c in every)}"
        )
    return tuple(c for c in every if c.name in names)
