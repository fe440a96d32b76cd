"""The peer contender: Starlette on uvicorn, untraced (``app``) and traced
(``create_traced_app``: opentelemetry-instrumentation-asgi, the SDK's
``BatchSpanProcessor`` and the official OTLP/HTTP protobuf exporter, configured
from the standard ``OTEL_EXPORTER_OTLP_*`` variables).

Run with ``uvicorn loadtest.apps.starlette_app:app --http h11`` or
``uvicorn --factory loadtest.apps.starlette_app:create_traced_app --http h11``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

__all__ = ["app", "create_traced_app"]


async def get_item(request: Request) -> JSONResponse:
    item_id = request.path_params["id"]
    return JSONResponse({"id": item_id, "name": f"item {item_id}"})


ROUTES = [Route("/items/{id}", get_item)]

app = Starlette(routes=ROUTES)


def create_traced_app() -> ASGIApp:
    """Starlette wrapped in ``OpenTelemetryMiddleware``, exporting to ``OTEL_EXPORTER_OTLP_*``.

    The tracer provider is shut down (its batch processor drained) when the
    server's lifespan ends, so a SIGTERM'd server delivers what it buffered.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "loadtest-starlette"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            provider.shutdown()

    inner = Starlette(routes=ROUTES, lifespan=lifespan)
    return OpenTelemetryMiddleware(inner, tracer_provider=provider)
