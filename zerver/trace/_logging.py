"""Logging through structlog: a console renderer on a TTY, JSON lines otherwise.

zerver and app code log through structlog; the standard library's ``logging``
(httpx, asyncio, any library) is routed through structlog's stdlib integration
(``structlog.stdlib.ProcessorFormatter`` on the root logger), so its lines come
out in the same format, with the same trace context. httpx and httpcore log
every request at INFO: they are kept at WARNING unless the level is ``debug``.

The access log is a :class:`~zerver.trace.Subscriber`: one line per finished
request with method, route, status, duration and request id.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import orjson
import structlog

from ._records import RequestRecord, active_span

__all__ = ["AccessLog", "add_trace_context", "configure_logging"]


def add_trace_context(
    logger: object, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: ``trace_id``, ``span_id`` and ``request_id`` of the work in hand.

    The span is the step, effect or continuation running when the line is
    logged (the request's root span outside them). Costs nothing when no
    request is active.
    """
    active = active_span.get()
    if active is not None:
        record, span_id = active
        event_dict.setdefault("trace_id", f"{record.trace_id:032x}")
        event_dict.setdefault("span_id", f"{span_id:016x}")
        event_dict.setdefault("request_id", record.request_id)
    return event_dict


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _orjson_dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


# Libraries that log each request at INFO: quiet unless the level is debug.
_CHATTY = ("httpx", "httpcore")


class _StdlibHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root logger's handler :func:`configure_logging` installs (found again by type)."""


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for zerver and the app, and the standard library's
    ``logging`` to render through it.

    ``fmt`` is ``console``, ``json`` or ``auto`` (console on a TTY, JSON
    otherwise); ``level`` is ``debug|info|warning|error``.
    """
    out = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_context,
        structlog.processors.add_log_level,
    ]
    renderer: structlog.types.Processor
    if fmt == "console":
        shared.append(structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False))
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        tail: list[structlog.types.Processor] = []
    else:
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        tail = [structlog.processors.format_exc_info]
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (message and newline together): with PYTHONUNBUFFERED a
        # print() is two writes, and the lines of several worker processes sharing
        # one stdout could run into each other.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(out, level, shared, tail, renderer)


def _route_stdlib(
    out: TextIO,
    level: str,
    shared: list[structlog.types.Processor],
    tail: list[structlog.types.Processor],
    renderer: structlog.types.Processor,
) -> None:
    """One root handler rendering stdlib records with structlog's processors."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )
    handler = _StdlibHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


class AccessLog:
    """Logs one ``request`` line per finished request."""

    def __init__(self, logger_name: str = "zerver.access") -> None:
        self._log = structlog.get_logger(logger_name)

    def on_request_end(self, record: RequestRecord) -> None:
        self._log.info(
            "request",
            method=record.method,
            route=record.route,
            path=record.path,
            status=record.status,
            duration_ms=round(record.duration_ns / 1e6, 3),
            request_id=record.request_id,
        )
