"""Exporter configuration from the standard ``OTEL_*`` variables and zerver's own.

Parsed by hand rather than with pydantic-settings because the OpenTelemetry
rules do not fit one field per variable: a per-signal variable overrides the
generic one, ``OTEL_EXPORTER_OTLP_ENDPOINT`` gets ``/v1/traces`` appended while
the per-signal endpoint is used as is, headers are ``k=v`` lists with URL
escapes, and an empty value means "unset". Every error is one
:class:`~zerver.ConfigError` line naming the variable, the value and what is
accepted.

TLS (``OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE``, ``..._CLIENT_CERTIFICATE``,
``..._CLIENT_KEY``): paths to PEM files, checked at start-up by building the
``ssl.SSLContext`` the exporter will use, so a missing, unreadable or
mismatched file stops start-up instead of failing every export later.
"""

from __future__ import annotations

import enum
import os
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from zerver.core._errors import ConfigError

__all__ = ["ExportConfig", "MetricsExportConfig", "Overflow", "tls_context"]

T = TypeVar("T")

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_METRICS_ENDPOINT = "http://localhost:4318/v1/metrics"


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


def _ms(minimum: int) -> Callable[[str, str], float]:
    """A parser of whole milliseconds >= ``minimum``, giving seconds."""
    what = "a whole number of milliseconds" + (" > 0" if minimum > 0 else " >= 0")
    return lambda name, raw: _int(name, raw, minimum=minimum, what=what) / 1000


def _count(minimum: int) -> Callable[[str, str], int]:
    return lambda name, raw: _int(name, raw, minimum=minimum, what=f"an integer >= {minimum}")


def _protocol(hint: str = "") -> Callable[[str, str], str]:
    """A parser of ``OTEL_EXPORTER_OTLP_[<SIGNAL>_]PROTOCOL``; ``hint`` ends the grpc refusal."""

    def parse(name: str, raw: str) -> str:
        if raw.strip().lower() == "grpc":
            raise ConfigError(
                f"{name}={raw!r} is not supported: zerver exports over OTLP/HTTP; "
                f"expected http/json or http/protobuf{hint}"
            )
        return _choice(name, raw, ("http/json", "http/protobuf"))

    return parse


_TRACES_PROTOCOL = _protocol(" (Collector and Jaeger take both on 4318)")


def _compression(name: str, raw: str) -> str:
    return _choice(name, raw, ("gzip", "none"))


def _trace_exporters(name: str, raw: str) -> tuple[str, ...]:
    names = tuple(_choice(name, part, ("otlp", "console", "none")) for part in raw.split(","))
    if "none" in names and len(names) > 1:
        raise _reject(name, raw, "'none' alone, or otlp and/or console")
    return () if names == ("none",) else tuple(dict.fromkeys(names))


def _metrics_exporter(name: str, raw: str) -> str:
    if raw.strip().lower() == "prometheus":
        raise ConfigError(
            f"{name}={raw!r} is not supported: zerver pushes metrics over OTLP/HTTP; "
            "expected otlp, console or none (a Collector can serve Prometheus)"
        )
    return _choice(name, raw, ("otlp", "console", "none"))


def _overflow(name: str, raw: str) -> Overflow:
    return Overflow(_choice(name, raw, tuple(o.value for o in Overflow)))


def _rate(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise _reject(name, raw, "a number >= 0 (0 turns the limit off)") from None
    if not value >= 0 or value == float("inf"):
        raise _reject(name, raw, "a number >= 0 (0 turns the limit off)")
    return value


def _temporality(name: str, raw: str) -> str:
    return _choice(name, raw, ("cumulative", "delta", "lowmemory"))


def _spool_mib(name: str, raw: str) -> int:
    return _int(name, raw, minimum=1, what="a whole number of MiB >= 1") * 2**20


def _pem_file(name: str, raw: str) -> str:
    path = raw.strip()
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise _reject(name, raw, f"a readable PEM file ({why})") from None
    return path


def _spool_dir(name: str, raw: str) -> str | None:
    """``off`` (or ``none``) → no spool; else a directory that exists or can be made,
    and is writable."""
    if raw.strip().lower() in ("off", "none"):
        return None
    path = os.path.abspath(os.path.expanduser(raw.strip()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise _reject(name, raw, f"a directory zerver can create ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _reject(name, raw, "a writable directory, or off")
    return path


def tls_context(
    certificate: str | None = None,
    client_certificate: str | None = None,
    client_key: str | None = None,
) -> ssl.SSLContext:
    """The client ``SSLContext`` for HTTPS exports.

    ``certificate``: PEM file with the CA certificate(s) that verify the
    server, *instead of* the system's trust store (as the OpenTelemetry SDKs
    do); ``None`` keeps the system's. ``client_certificate`` (and
    ``client_key``, unless the key is in the same file): the client's PEM
    certificate chain and unencrypted private key for mutual TLS. Hostnames
    are checked.

    Raises ``OSError`` for a file that cannot be read and ``ssl.SSLError``
    for one that holds no usable certificate or key.
    """
    context = ssl.create_default_context(cafile=certificate)
    if client_certificate is not None:
        # An encrypted key fails here rather than have OpenSSL prompt on a terminal.
        context.load_cert_chain(client_certificate, client_key, password=_no_password)
    return context


def _no_password() -> bytes:
    return b""


def _tls_settings(
    names: dict[str, str], certificate: str | None, client_cert: str | None, client_key: str | None
) -> None:
    """Build the context once to reject unusable files with a one-line error."""
    if client_key is not None and client_cert is None:
        raise ConfigError(
            f"{names['key']}={client_key!r} is invalid: a client key needs "
            "OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_CERTIFICATE (the certificate it belongs to)"
        )
    if certificate is not None:
        try:
            tls_context(certificate)
        except (OSError, ValueError) as exc:
            raise _reject(
                names["ca"], certificate, f"a PEM file of CA certificates ({_reason(exc)})"
            ) from None
    if client_cert is not None:
        try:
            tls_context(None, client_cert, client_key)
        except (OSError, ValueError) as exc:
            if client_key is None:
                raise _reject(
                    names["cert"],
                    client_cert,
                    "a PEM file with the client certificate chain and its unencrypted private "
                    f"key, or the key in OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_KEY ({_reason(exc)})",
                ) from None
            raise ConfigError(
                f"{names['cert']}={client_cert!r} with {names['key']}={client_key!r} is invalid: "
                f"expected a PEM certificate chain and its matching, unencrypted PEM private key "
                f"({_reason(exc)})"
            ) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        # e.g. "[SSL] PEM lib (_ssl.c:3926)": keep what OpenSSL said, not where.
        return exc.strerror.split(" (_ssl.c:")[0].removeprefix("[SSL] ")
    return str(exc) or type(exc).__name__


class _Env:
    """The variables of one signal (``TRACES``, ``METRICS``) as the OpenTelemetry rules
    read them: an empty value is unset, a per-signal variable overrides the generic one."""

    __slots__ = ("_environ", "_signal")

    def __init__(self, environ: Mapping[str, str] | None, signal: str) -> None:
        self._environ = os.environ if environ is None else environ
        self._signal = signal

    def get(self, name: str) -> str | None:
        raw = self._environ.get(name)
        return raw if raw is not None and raw.strip() != "" else None

    def opt(self, name: str, parse: Callable[[str, str], T], default: T) -> T:
        raw = self.get(name)
        return default if raw is None else parse(name, raw)

    def signal_name(self, suffix: str) -> str:
        """The variable that applies: per-signal if set, else the generic one."""
        name = f"OTEL_EXPORTER_OTLP_{self._signal}_{suffix}"
        return name if self.get(name) is not None else f"OTEL_EXPORTER_OTLP_{suffix}"

    def signal(self, suffix: str, parse: Callable[[str, str], T], default: T) -> T:
        return self.opt(self.signal_name(suffix), parse, default)

    def endpoint(self, default: str) -> str:
        """Per-signal as is, else generic + ``/v1/<signal>``, else ``default``."""
        name = f"OTEL_EXPORTER_OTLP_{self._signal}_ENDPOINT"
        raw = self.get(name)
        if raw is not None:
            return _endpoint(name, raw)
        raw = self.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if raw is not None:
            base = _endpoint("OTEL_EXPORTER_OTLP_ENDPOINT", raw)
            return base.rstrip("/") + "/v1/" + self._signal.lower()
        return default


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
    certificate: str | None = None
    """CA certificate(s) (PEM file) to verify an ``https`` endpoint; ``None``: the system's."""
    client_certificate: str | None = None
    """Client certificate chain (PEM file) for mutual TLS."""
    client_key: str | None = None
    """The client certificate's private key (PEM file), unless it is in that file."""
    spool_dir: str | None = None
    """``ZER_VER_EXPORT_SPOOL_DIR``: where batches that cannot be sent now wait on disk
    (see :class:`~zerver.export.Spool`); ``None``: no spool, such batches are dropped."""
    spool_max_bytes: int = 256 * 1024 * 1024
    """``ZER_VER_EXPORT_SPOOL_MAX_MB``: the spool's quota; past it, batches are dropped
    (counted as ``spool_full`` and logged)."""

    def ssl_context(self) -> ssl.SSLContext | None:
        """The ``SSLContext`` for an ``https`` endpoint; ``None`` when no TLS
        variable is set (the system's default context is used)."""
        if self.certificate is None and self.client_certificate is None:
            return None
        return tls_context(self.certificate, self.client_certificate, self.client_key)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, default_spool_dir: str | None = None
    ) -> ExportConfig:
        """Read the configuration; ``environ`` defaults to ``os.environ``.

        ``default_spool_dir`` applies when ``ZER_VER_EXPORT_SPOOL_DIR`` is unset
        (``zerver run`` passes a per-service directory); ``off`` turns the spool off.
        Raises :class:`~zerver.ConfigError` naming the first invalid variable.
        """
        env = _Env(environ, "TRACES")
        opt, signal = env.opt, env.signal
        # Read first: a bad endpoint is the error reported before any other.
        endpoint = env.endpoint(DEFAULT_ENDPOINT)
        cfg = cls(
            exporters=opt("OTEL_TRACES_EXPORTER", _trace_exporters, ("otlp",)),
            endpoint=endpoint,
            protocol=signal("PROTOCOL", _TRACES_PROTOCOL, "http/json"),
            headers=signal("HEADERS", _headers, ()),
            timeout_s=signal("TIMEOUT", _ms(1), 10.0),
            compression=signal("COMPRESSION", _compression, "none"),
            max_queue_size=opt("OTEL_BSP_MAX_QUEUE_SIZE", _count(1), 2048),
            max_export_batch_size=opt("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", _count(1), 512),
            schedule_delay_s=opt("OTEL_BSP_SCHEDULE_DELAY", _ms(0), 5.0),
            export_timeout_s=opt("OTEL_BSP_EXPORT_TIMEOUT", _ms(1), 30.0),
            overflow=opt("ZER_VER_EXPORT_OVERFLOW", _overflow, Overflow.DROP_NEWEST),
            block_timeout_s=opt("ZER_VER_EXPORT_BLOCK_TIMEOUT_MS", _ms(0), 0.5),
            breaker_failures=opt("ZER_VER_EXPORT_BREAKER_FAILURES", _count(0), 5),
            breaker_cooldown_s=opt("ZER_VER_EXPORT_BREAKER_COOLDOWN_MS", _ms(1), 30.0),
            breaker_successes=opt("ZER_VER_EXPORT_BREAKER_SUCCESSES", _count(1), 2),
            rate_spans_per_s=opt("ZER_VER_EXPORT_RATE_SPANS", _rate, 0.0),
            rate_bytes_per_s=opt("ZER_VER_EXPORT_RATE_BYTES", _rate, 0.0),
            certificate=signal("CERTIFICATE", _pem_file, None),
            client_certificate=signal("CLIENT_CERTIFICATE", _pem_file, None),
            client_key=signal("CLIENT_KEY", _pem_file, None),
            spool_dir=opt("ZER_VER_EXPORT_SPOOL_DIR", _spool_dir, default_spool_dir),
            spool_max_bytes=opt("ZER_VER_EXPORT_SPOOL_MAX_MB", _spool_mib, 256 * 2**20),
        )
        _tls_settings(
            {
                "ca": env.signal_name("CERTIFICATE"),
                "cert": env.signal_name("CLIENT_CERTIFICATE"),
                "key": env.signal_name("CLIENT_KEY"),
            },
            cfg.certificate,
            cfg.client_certificate,
            cfg.client_key,
        )
        if cfg.max_export_batch_size > cfg.max_queue_size:
            raise ConfigError(
                f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={cfg.max_export_batch_size!r} is invalid: "
                f"expected at most OTEL_BSP_MAX_QUEUE_SIZE ({cfg.max_queue_size})"
            )
        return cfg


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsExportConfig:
    """What the metrics export reads from the environment, with defaults.

    The OTLP variables follow the traces' rules with ``METRICS`` as the signal:
    ``OTEL_EXPORTER_OTLP_METRICS_<X>`` when set, else ``OTEL_EXPORTER_OTLP_<X>``
    (the generic endpoint gets ``/v1/metrics`` appended). Retries, the circuit
    breaker and TLS files are the traces' (:class:`ExportConfig`).
    """

    exporter: str = "otlp"
    """``OTEL_METRICS_EXPORTER``: ``otlp``, ``console`` or ``none``."""
    endpoint: str = DEFAULT_METRICS_ENDPOINT
    protocol: str = "http/json"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0
    """Per HTTP request (``OTEL_EXPORTER_OTLP_[METRICS_]TIMEOUT``, ms)."""
    compression: str = "none"
    interval_s: float = 60.0
    """Between two collections (``OTEL_METRIC_EXPORT_INTERVAL``, ms)."""
    export_timeout_s: float = 30.0
    """One export's overall deadline, retries included (``OTEL_METRIC_EXPORT_TIMEOUT``, ms)."""
    temporality: str = "cumulative"
    """``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``: ``cumulative``, ``delta``
    or ``lowmemory``."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MetricsExportConfig:
        """Read the configuration; ``environ`` defaults to ``os.environ``.

        Raises :class:`~zerver.ConfigError` naming the first invalid variable.
        """
        env = _Env(environ, "METRICS")
        opt, signal = env.opt, env.signal
        # Read first: a bad endpoint is the error reported before any other.
        endpoint = env.endpoint(DEFAULT_METRICS_ENDPOINT)
        return cls(
            exporter=opt("OTEL_METRICS_EXPORTER", _metrics_exporter, "otlp"),
            endpoint=endpoint,
            protocol=signal("PROTOCOL", _protocol(), "http/json"),
            headers=signal("HEADERS", _headers, ()),
            timeout_s=signal("TIMEOUT", _ms(1), 10.0),
            compression=signal("COMPRESSION", _compression, "none"),
            interval_s=opt("OTEL_METRIC_EXPORT_INTERVAL", _ms(1), 60.0),
            export_timeout_s=opt("OTEL_METRIC_EXPORT_TIMEOUT", _ms(1), 30.0),
            temporality=opt(
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", _temporality, "cumulative"
            ),
        )
