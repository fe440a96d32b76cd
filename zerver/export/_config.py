"""Exporter configuration from the standard ``OTEL_*`` variables and zerver's own.

Parsed by hand rather than with pydantic-settings because the OpenTelemetry
rules do not fit one field per variable: a per-signal variable overrides the
generic one, ``OTEL_EXPORTER_OTLP_ENDPOINT`` gets ``/v1/traces`` appended while
the per-signal endpoint is used as is, headers are ``k=v`` lists with URL
escapes, and an empty value means "unset". Every error is one
:class:`~zerver.ConfigError` line naming the variable, the value and what is
accepted.
"""

from __future__ import annotations

import enum
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from zerver._errors import ConfigError

__all__ = ["ExportConfig", "Overflow"]

T = TypeVar("T")

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"


class Overflow(enum.Enum):
    """What ``submit`` does when the buffer is full (``ZER_VER_EXPORT_OVERFLOW``)."""

    DROP_NEWEST = "drop_newest"
    """Refuse the new span (counted as ``queue_full``). Never blocks; the default."""
    DROP_OLDEST = "drop_oldest"
    """Evict the oldest buffered span to make room (counted as ``evicted``)."""
    BLOCK = "block"
    """Wait up to the block timeout for room, then drop (``block_timeout``).

    This blocks the caller's thread, the event loop included: use it where
    losing spans is worse than added latency (batch jobs, tests)."""


def _reject(name: str, raw: str, accepted: str) -> ConfigError:
    return ConfigError(f"{name}={raw!r} is invalid: expected {accepted}")


def _int(name: str, raw: str, *, minimum: int, what: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise _reject(name, raw, what) from None
    if value < minimum:
        raise _reject(name, raw, what)
    return value


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise _reject(name, raw, "one of " + ", ".join(choices))
    return value


def _endpoint(name: str, raw: str) -> str:
    url = raw.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _reject(name, raw, "an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise _reject(name, raw, "an http:// or https:// URL with a valid port") from None
    return url


def _headers(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = urllib.parse.unquote(key.strip())
        if not sep or not key:
            raise _reject(name, raw, "comma-separated key=value pairs (URL-encoded)")
        out.append((key, urllib.parse.unquote(value.strip())))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportConfig:
    """Everything the export pipeline reads from the environment, with defaults.

    Build it with :meth:`from_env` (tests pass a dict) or directly.
    """

    exporters: tuple[str, ...] = ("otlp",)
    """``OTEL_TRACES_EXPORTER``: ``otlp`` and/or ``console`` (comma-separated), or ``none``."""
    endpoint: str = DEFAULT_ENDPOINT
    protocol: str = "http/json"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0
    """Per HTTP request (``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT``, ms)."""
    compression: str = "none"
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_s: float = 5.0
    export_timeout_s: float = 30.0
    """One batch's overall deadline, retries included (``OTEL_BSP_EXPORT_TIMEOUT``, ms)."""
    overflow: Overflow = Overflow.DROP_NEWEST
    block_timeout_s: float = 0.5
    breaker_failures: int = 5
    """Consecutive failed batches that open the breaker; 0 disables it."""
    breaker_cooldown_s: float = 30.0
    breaker_successes: int = 2
    rate_spans_per_s: float = 0.0
    rate_bytes_per_s: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ExportConfig:
        """Read the configuration; ``environ`` defaults to ``os.environ``.

        Raises :class:`~zerver.ConfigError` naming the first invalid variable.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            raw = env.get(name)
            return raw if raw is not None and raw.strip() != "" else None

        def signal(suffix: str, parse: Callable[[str, str], T], default: T) -> T:
            for name in (f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"):
                raw = get(name)
                if raw is not None:
                    return parse(name, raw)
            return default

        def opt(name: str, parse: Callable[[str, str], T], default: T) -> T:
            raw = get(name)
            return default if raw is None else parse(name, raw)

        def ms(minimum: int) -> Callable[[str, str], float]:
            what = "a whole number of milliseconds" + (" > 0" if minimum > 0 else " >= 0")
            return lambda n, r: _int(n, r, minimum=minimum, what=what) / 1000

        def count(minimum: int) -> Callable[[str, str], int]:
            return lambda n, r: _int(n, r, minimum=minimum, what=f"an integer >= {minimum}")

        # Endpoint precedence: per-signal as is, generic + /v1/traces, default.
        raw = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if raw is not None:
            endpoint = _endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raw)
        else:
            raw = get("OTEL_EXPORTER_OTLP_ENDPOINT")
            if raw is not None:
                base = _endpoint("OTEL_EXPORTER_OTLP_ENDPOINT", raw)
                endpoint = base.rstrip("/") + "/v1/traces"
            else:
                endpoint = DEFAULT_ENDPOINT

        def protocol(name: str, raw: str) -> str:
            if raw.strip().lower() == "grpc":
                raise ConfigError(
                    f"{name}={raw!r} is not supported: zerver exports over OTLP/HTTP; "
                    "expected http/json or http/protobuf (Collector and Jaeger take both on 4318)"
                )
            return _choice(name, raw, ("http/json", "http/protobuf"))

        def exporters(name: str, raw: str) -> tuple[str, ...]:
            names = tuple(
                _choice(name, part, ("otlp", "console", "none")) for part in raw.split(",")
            )
            if "none" in names and len(names) > 1:
                raise _reject(name, raw, "'none' alone, or otlp and/or console")
            return () if names == ("none",) else tuple(dict.fromkeys(names))

        def overflow(name: str, raw: str) -> Overflow:
            return Overflow(_choice(name, raw, tuple(o.value for o in Overflow)))

        def rate(name: str, raw: str) -> float:
            try:
                value = float(raw.strip())
            except ValueError:
                raise _reject(name, raw, "a number >= 0 (0 turns the limit off)") from None
            if not value >= 0 or value == float("inf"):
                raise _reject(name, raw, "a number >= 0 (0 turns the limit off)")
            return value

        cfg = cls(
            exporters=opt("OTEL_TRACES_EXPORTER", exporters, ("otlp",)),
            endpoint=endpoint,
            protocol=signal("PROTOCOL", protocol, "http/json"),
            headers=signal("HEADERS", _headers, ()),
            timeout_s=signal("TIMEOUT", ms(1), 10.0),
            compression=signal("COMPRESSION", lambda n, r: _choice(n, r, ("gzip", "none")), "none"),
            max_queue_size=opt("OTEL_BSP_MAX_QUEUE_SIZE", count(1), 2048),
            max_export_batch_size=opt("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", count(1), 512),
            schedule_delay_s=opt("OTEL_BSP_SCHEDULE_DELAY", ms(0), 5.0),
            export_timeout_s=opt("OTEL_BSP_EXPORT_TIMEOUT", ms(1), 30.0),
            overflow=opt("ZER_VER_EXPORT_OVERFLOW", overflow, Overflow.DROP_NEWEST),
            block_timeout_s=opt("ZER_VER_EXPORT_BLOCK_TIMEOUT_MS", ms(0), 0.5),
            breaker_failures=opt("ZER_VER_EXPORT_BREAKER_FAILURES", count(0), 5),
            breaker_cooldown_s=opt("ZER_VER_EXPORT_BREAKER_COOLDOWN_MS", ms(1), 30.0),
            breaker_successes=opt("ZER_VER_EXPORT_BREAKER_SUCCESSES", count(1), 2),
            rate_spans_per_s=opt("ZER_VER_EXPORT_RATE_SPANS", rate, 0.0),
            rate_bytes_per_s=opt("ZER_VER_EXPORT_RATE_BYTES", rate, 0.0),
        )
        if cfg.max_export_batch_size > cfg.max_queue_size:
            raise ConfigError(
                f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={cfg.max_export_batch_size!r} is invalid: "
                f"expected at most OTEL_BSP_MAX_QUEUE_SIZE ({cfg.max_queue_size})"
            )
        return cfg
