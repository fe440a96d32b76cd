"""Configuration: one pydantic-settings model reads every ``ZER_VER_*`` variable.

An invalid value stops start-up with :class:`~zerver.ConfigError`, whose
message is one line naming the variable, the value and what is accepted.
docs/configuration.md lists every variable with its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._errors import ConfigError

__all__ = ["Settings", "load_settings"]

_PREFIX = "ZER_VER_"


class Settings(BaseSettings):
    """Every ``ZER_VER_*`` setting, with its default."""

    model_config = SettingsConfigDict(
        env_prefix=_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    # Job system.
    queue_name_effects: str = Field("effects", min_length=1)
    queue_name_cont: str = Field("continuations", min_length=1)
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

    # Embedded interpreters.
    db_path: str = "zerver.sqlite3"
    db_pool_size: int = Field(4, ge=1, le=1000)
    cache_max_entries: int = Field(10_000, ge=1)
    cache_ttl_ms: int = Field(60_000, ge=1)

    # Logging.
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("access_log", mode="before")
    @classmethod
    def _strict_bool(cls, v: Any) -> Any:
        return parse_bool(v)


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


def _accepted(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    if kind == "literal_error":
        return f"accepted: {ctx.get('expected', '')}"
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        return str(err.get("msg", "")).lower()
    if kind.startswith("int_"):
        return "accepted: a whole number"
    if kind.startswith("float_"):
        return "accepted: a number"
    msg = str(err.get("msg", ""))
    return msg.removeprefix("Value error, ")


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from ``environ`` (default: ``os.environ``) plus keyword overrides.

    Raises :class:`ConfigError` naming the first invalid variable.
    """
    try:
        if environ is None:
            return Settings(**overrides)
        values: dict[str, Any] = {}
        for name in Settings.model_fields:
            key = _PREFIX + name.upper()
            for k, v in environ.items():
                if k.upper() == key:
                    values[name] = v
        values.update(overrides)
        return Settings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = _PREFIX + field.upper()
        raise ConfigError(f"{var}={err.get('input')!r} is invalid: {_accepted(err)}") from None
