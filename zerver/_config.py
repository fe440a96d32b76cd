"""Configuration: one pydantic-settings model reads every ``ZER_VER_*`` variable.

An invalid value stops start-up with :class:`~zerver.ConfigError`, whose
message is one line naming the variable, the value and what is accepted.
docs/configuration.md lists every variable with its default.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from zerver.core._errors import ConfigError

from ._specs import (
    OTEL_SAMPLERS,
    SamplerSpec,
    Window,
    otel_sampler_spec,
    parse_ratio,
    parse_sampler,
    parse_window,
)

__all__ = ["Settings", "load_settings"]

_PREFIX = "ZER_VER_"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def check_path(text: str) -> str:
    """The pages' path prefix (``/debug``); raises ``ValueError`` saying what is accepted."""
    if not _PATH.match(text):
        raise ValueError(
            "accepted: a path such as /debug (segments of letters, digits, '.', '_', '~' "
            "or '-', no trailing slash)"
        )
    return text


def parse_networks(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8, 192.168.1.7, fd00::/8`` parsed; raises ``ValueError`` on a bad entry."""
    nets: list[Network] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"accepted: comma-separated addresses or networks such as 10.0.0.0/8 (not {item!r})"
            ) from None
    return tuple(nets)


class Settings(BaseSettings):
    """Every ``ZER_VER_*`` setting, with its default."""

    model_config = SettingsConfigDict(
        env_prefix=_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() reads the environment it is given (os.environ by default),
        # so tests can pass a plain dict and nothing leaks in from the process.
        return (init_settings,)

    # Job system.
    queue_name_effects: str = Field("effects", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    queue_name_cont: str = Field("continuations", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    queue_capacity_effects: int = Field(1024, ge=1)
    queue_capacity_cont: int = Field(1024, ge=1)
    workers_effects: int = Field(64, ge=1, le=10_000)
    workers_cont: int = Field(4, ge=1, le=10_000)
    max_need_depth: int = Field(16, ge=1, le=1000)

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    max_body_bytes: int = Field(1024 * 1024, ge=0)
    header_timeout_s: float = Field(10.0, gt=0)
    keepalive_timeout_s: float = Field(5.0, gt=0)
    shutdown_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    write_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(1000, ge=1)
    transport: Literal["auto", "streams", "protocol"] = "auto"
    # The cyclic collector's first threshold in a `zerver` process (Python's is 700).
    gc_threshold: int = Field(10_000, ge=0)

    # Embedded interpreters.
    db_path: str = "zerver.sqlite3"
    # None: the backend's own default (SQLite 32, PostgreSQL 4; docs/configuration.md).
    db_pool_size: int | None = Field(None, ge=1, le=1000)
    # postgresql://... or sqlite:///path (docs/backends.md); the path alone is db_path.
    db_url: str | None = None
    cache_max_entries: int = Field(10_000, ge=1)
    cache_ttl_ms: int = Field(60_000, ge=1)
    # Shared Redis backends (docs/backends.md); checked, password masked, by the app.
    cache_url: str | None = None
    broker_url: str | None = None
    broker_visibility_timeout_ms: int = Field(30_000, ge=1)

    # Demo service.
    demo_base_url: str | None = None

    # Trace engine.
    promote_queue_ms: float = Field(5.0, ge=0)
    promote_park_ms: float = Field(5.0, ge=0)
    promote_p95_min_ms: float = Field(1.0, ge=0)
    debug_jobs: bool = False
    otel_context: bool = True
    export_process: Literal["auto", "on", "off"] = "auto"
    export_priority: Literal["idle", "normal"] = "idle"
    export_job_depth: bool = False
    semconv: Literal["old", "new", "dup"] | None = None
    metrics_view_route_p95_window: str = "60s"
    sampler: str | None = None
    traces_sampler: str | None = Field(None, validation_alias="OTEL_TRACES_SAMPLER")
    traces_sampler_arg: str | None = Field(None, validation_alias="OTEL_TRACES_SAMPLER_ARG")
    service_name: str | None = Field(None, validation_alias="OTEL_SERVICE_NAME")
    resource_attributes: str = Field("", validation_alias="OTEL_RESOURCE_ATTRIBUTES")
    semconv_stability_opt_in: str = Field("", validation_alias="OTEL_SEMCONV_STABILITY_OPT_IN")

    # Secrets and limits in telemetry (docs/security.md).
    redact_query_params: str = ""
    trace_exception_stacktrace: bool = True
    capture_headers_server_request: str = Field(
        "", validation_alias="OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST"
    )
    capture_headers_server_response: str = Field(
        "", validation_alias="OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE"
    )
    capture_headers_client_request: str = Field(
        "", validation_alias="OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST"
    )
    capture_headers_client_response: str = Field(
        "", validation_alias="OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE"
    )
    capture_headers_sanitize_fields: str = Field(
        "", validation_alias="OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"
    )
    attribute_value_length_limit: int | None = Field(
        None, ge=0, validation_alias="OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"
    )
    span_attribute_value_length_limit: int | None = Field(
        None, ge=0, validation_alias="OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"
    )
    attribute_count_limit: int = Field(128, ge=0, validation_alias="OTEL_ATTRIBUTE_COUNT_LIMIT")
    span_attribute_count_limit: int | None = Field(
        None, ge=0, validation_alias="OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"
    )
    span_event_count_limit: int = Field(128, ge=0, validation_alias="OTEL_SPAN_EVENT_COUNT_LIMIT")
    span_link_count_limit: int = Field(128, ge=0, validation_alias="OTEL_SPAN_LINK_COUNT_LIMIT")
    event_attribute_count_limit: int | None = Field(
        None, ge=0, validation_alias="OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT"
    )
    link_attribute_count_limit: int | None = Field(
        None, ge=0, validation_alias="OTEL_LINK_ATTRIBUTE_COUNT_LIMIT"
    )

    @field_validator("trace_exception_stacktrace", mode="before")
    @classmethod
    def _stacktrace_bool(cls, v: Any) -> Any:
        return parse_bool(v)

    @field_validator("redact_query_params")
    @classmethod
    def _query_params(cls, v: str) -> str:
        from zerver.core._attributes import Redaction

        try:
            Redaction.parse(v)
        except ValueError as exc:
            raise ValueError(f"accepted: comma-separated query parameter names ({exc})") from None
        return v

    @field_validator(
        "capture_headers_server_request",
        "capture_headers_server_response",
        "capture_headers_client_request",
        "capture_headers_client_response",
        "capture_headers_sanitize_fields",
    )
    @classmethod
    def _header_names(cls, v: str) -> str:
        for name in v.split(","):
            try:
                re.compile(name.strip())
            except re.error as exc:
                raise ValueError(
                    f"accepted: comma-separated header names or regular expressions ({exc})"
                ) from None
        return v

    # In-process trace pages (docs/tracez.md).
    zpages: bool = False
    zpages_path: str = "/debug"
    zpages_allow: str = ""

    @field_validator("zpages", "trace_response_header", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        """A switch: ``on``/``off`` as well as a boolean's 1/0/true/false."""
        if isinstance(v, str) and v.strip().lower() in ("on", "off"):
            return v.strip().lower() == "on"
        try:
            return parse_bool(v)
        except ValueError:
            raise ValueError("accepted: on, off, 1, 0, true, false") from None

    @field_validator("zpages_path")
    @classmethod
    def _zpages_path(cls, v: str) -> str:
        return check_path(v)

    @field_validator("zpages_allow")
    @classmethod
    def _zpages_allow(cls, v: str) -> str:
        parse_networks(v)
        return v

    # What a new user sees of traces (docs/getting-started.md, docs/exporting.md).
    trace_response_header: bool = True
    console_format: Literal["tree", "jsonl"] = "tree"

    @field_validator("console_format", mode="before")
    @classmethod
    def _console_format(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    # Logging.
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True

    @field_validator(
        "log_format", "log_level", "semconv", "transport", "export_priority", mode="before"
    )
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("access_log", "debug_jobs", "export_job_depth", "otel_context", mode="before")
    @classmethod
    def _strict_bool(cls, v: Any) -> Any:
        return parse_bool(v)

    @field_validator("export_process", mode="before")
    @classmethod
    def _process(cls, v: Any) -> Any:
        if isinstance(v, str):
            low = v.strip().lower()
            return {"1": "on", "true": "on", "0": "off", "false": "off"}.get(low, low)
        return v

    @field_validator("demo_base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is not None and not _BASE_URL.match(v):
            raise ValueError("accepted: an http:// or https:// URL such as http://127.0.0.1:8080")
        return v

    @field_validator("db_url")
    @classmethod
    def _db_url(cls, v: str | None) -> str | None:
        if v is not None:
            parse_db_url(v)
        return v

    @property
    def db_backend(self) -> tuple[Literal["sqlite", "postgresql"], str]:
        """The database of the ``db`` effects: ``("postgresql", url)`` or ``("sqlite", path)``."""
        if self.db_url is None:
            return "sqlite", self.db_path
        return parse_db_url(self.db_url)

    @field_validator("metrics_view_route_p95_window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_window(v)
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str | None) -> str | None:
        if v is not None:
            parse_sampler(v)
        return v

    @field_validator("traces_sampler", mode="before")
    @classmethod
    def _otel_sampler(cls, v: Any) -> Any:
        if isinstance(v, str):
            # As the OpenTelemetry SDK: the name in any case.
            v = v.strip().lower()
            if v not in OTEL_SAMPLERS:
                raise ValueError("accepted: " + ", ".join(OTEL_SAMPLERS))
        return v

    @field_validator("traces_sampler_arg")
    @classmethod
    def _otel_sampler_arg(cls, v: str | None) -> str | None:
        if v is not None:
            parse_ratio(v)
        return v

    @field_validator("resource_attributes")
    @classmethod
    def _resource(cls, v: str) -> str:
        parse_resource_attributes(v)
        return v

    @property
    def semconv_mode(self) -> str:
        """``old``, ``new`` or ``dup``: ``ZER_VER_SEMCONV``, else the OTel opt-in, else ``dup``."""
        if self.semconv is not None:
            return self.semconv
        opts = {o.strip() for o in self.semconv_stability_opt_in.split(",")}
        if "http/dup" in opts:
            return "dup"
        if "http" in opts:
            return "new"
        return "dup"

    @property
    def route_window(self) -> Window:
        return parse_window(self.metrics_view_route_p95_window)

    @property
    def sampler_spec(self) -> SamplerSpec:
        """``ZER_VER_SAMPLER`` when set, else ``OTEL_TRACES_SAMPLER`` (and its
        argument), else ``head:1`` (parent-based, every new trace sampled)."""
        if self.sampler is not None:
            return parse_sampler(self.sampler)
        if self.traces_sampler is not None:
            return otel_sampler_spec(self.traces_sampler, self.traces_sampler_arg)
        return SamplerSpec()

    @property
    def resource_attrs(self) -> dict[str, str]:
        return parse_resource_attributes(self.resource_attributes)


_DB_URL_ACCEPTED = (
    "accepted: postgresql://user:password@host:port/dbname, or sqlite:///path "
    "(sqlite:////absolute/path, sqlite:///:memory:)"
)


def mask_url(url: str) -> str:
    """``url`` with its password (in the userinfo or a ``password=`` query
    parameter) replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that cannot be parsed>"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password|sslpassword)=[^&]*", r"\1\2=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def parse_db_url(url: str) -> tuple[Literal["sqlite", "postgresql"], str]:
    """``("postgresql", url)`` or ``("sqlite", path)`` for ``ZER_VER_DB_URL``; ValueError else."""
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else ""
        if not path:
            raise ValueError(_DB_URL_ACCEPTED)
        return "sqlite", unquote(path)
    if scheme in ("postgresql", "postgres"):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError(_DB_URL_ACCEPTED) from None
        if not parts.netloc and not parts.path.strip("/") and not parts.query:
            raise ValueError(_DB_URL_ACCEPTED)
        return "postgresql", url
    raise ValueError(_DB_URL_ACCEPTED)


def check_db_settings(settings: Settings, given: set[str]) -> None:
    """ConfigError when ``ZER_VER_DB_URL`` and ``ZER_VER_DB_PATH`` (both in ``given``)
    name different databases."""
    if settings.db_url is None or "db_path" not in given:
        return
    kind, target = settings.db_backend
    if kind == "sqlite" and target == settings.db_path:
        return
    raise ConfigError(
        f"ZER_VER_DB_URL={mask_url(settings.db_url)!r} and ZER_VER_DB_PATH="
        f"{settings.db_path!r} name different databases: set only one of them"
    )


def parse_resource_attributes(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` (values URL-decoded), as ``OTEL_RESOURCE_ATTRIBUTES``."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError("accepted: comma-separated key=value pairs")
        out[key] = unquote(value.strip())
    return out


_BASE_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


def parse_bool(v: Any) -> Any:
    """Booleans accept exactly 0/1/true/false (any case); anything else is left to fail."""
    if isinstance(v, str):
        low = v.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("accepted: 0, 1, true, false")
    return v


_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def _accepted(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    kind = str(err.get("type", ""))
    if kind == "literal_error":
        return f"accepted: {ctx.get('expected', '')}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"accepted: a number {op} {ctx.get(key)}"
    if kind == "string_too_short":
        return "accepted: a non-empty string"
    if kind == "string_pattern_mismatch":
        return "accepted: 1 to 64 letters, digits, '_', '.' or '-'"
    if kind.startswith("int_"):
        return "accepted: a whole number"
    if kind.startswith("float_"):
        return "accepted: a number"
    msg = str(err.get("msg", ""))
    return msg.removeprefix("Value error, ")


def env_name(field: str) -> str:
    """The environment variable a settings field is read from."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else _PREFIX + field.upper()


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from ``environ`` (default: ``os.environ``) plus keyword overrides.

    Raises :class:`ConfigError` naming the first invalid variable.
    """
    try:
        if environ is None:
            environ = os.environ
        upper = {k.upper(): v for k, v in environ.items()}
        values: dict[str, Any] = {}
        for name, info in Settings.model_fields.items():
            var = env_name(name)
            # As in OpenTelemetry, an empty value means "not set".
            if var in upper and upper[var].strip() != "":
                values[
                    info.validation_alias if isinstance(info.validation_alias, str) else name
                ] = upper[var]
        for name, value in overrides.items():
            info = Settings.model_fields[name]
            alias = info.validation_alias
            values[alias if isinstance(alias, str) else name] = value
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = env_name(field) if field in Settings.model_fields else field
        value = err.get("input")
        shown = mask_url(value) if isinstance(value, str) and "://" in value else value
        raise ConfigError(f"{var}={shown!r} is invalid: {_accepted(err)}") from None
    check_db_settings(settings, set(values))
    return settings


# A variable name as code reads it: a whole string literal such as "ZER_VER_EXPORT_OVERFLOW".
_VARIABLE_LITERAL = re.compile(r"""["'](ZER_VER_[A-Z0-9_]+)["']""")


def known_variables() -> frozenset[str]:
    """Every ``ZER_VER_*`` variable zerver reads, to tell a setting from a typo.

    Derived from the code so that it cannot drift from it: the fields of
    :class:`Settings`, plus each ``"ZER_VER_..."`` string literal in zerver's
    own modules (the variables read outside the model, such as the
    exporter's). Costs a few milliseconds; call it once at start-up.
    """
    from pathlib import Path

    names = {env_name(field) for field in Settings.model_fields}
    for source in Path(__file__).parent.rglob("*.py"):
        try:
            names.update(_VARIABLE_LITERAL.findall(source.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue  # an unreadable module reads no variable we could name
    return frozenset(name for name in names if name.startswith(_PREFIX))
