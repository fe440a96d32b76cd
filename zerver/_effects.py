"""Effects: descriptions of I/O that steps ask for and interpreters perform.

An effect is an immutable value. It names what to do (``DbGet`` of a key in a
table), how patient to be (``timeout_ms``), whether the request depends on it
(``required``), how to retry (:class:`RetryPolicy`) and which slot receives the
result. It never performs the I/O itself.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._slots import Slot

__all__ = [
    "CacheDel",
    "CacheGet",
    "CacheSet",
    "DbDel",
    "DbGet",
    "DbPut",
    "DbQuery",
    "Effect",
    "HttpDelete",
    "HttpGet",
    "HttpPost",
    "HttpPut",
    "HttpResult",
    "RetryPolicy",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a failed attempt is retried.

    ``max_attempts`` counts the first try (1 = no retry). The back-off before
    attempt *n+1* is ``backoff_ms * multiplier**(n-1)``, capped at
    ``max_backoff_ms``, then spread by ``±jitter`` (a fraction). Only errors
    marked retryable (timeouts, connection errors, upstream 5xx) are retried.
    """

    max_attempts: int = 1
    backoff_ms: float = 10.0
    multiplier: float = 2.0
    max_backoff_ms: float = 1000.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_ms < 0 or self.max_backoff_ms < 0:
            raise ValueError("back-off times must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, got {self.jitter}")

    def backoff_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """Milliseconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.backoff_ms * self.multiplier ** (attempt - 1), self.max_backoff_ms)
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            base *= 1.0 + spread
        return max(base, 0.0)


NO_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class Effect:
    """Base of every effect. Subclasses set ``system`` and ``operation``.

    ``name`` overrides the target shown in the span name
    (``<system>.<operation> <target>``).
    """

    system: ClassVar[str] = "other"
    operation: ClassVar[str] = "call"

    slot: Slot[Any] | None = None
    timeout_ms: int = 1000
    required: bool = True
    retry: RetryPolicy = NO_RETRY
    name: str | None = None

    @property
    def target(self) -> str:
        """What the effect acts on (a table, a cache namespace, a host)."""
        return self.name or ""

    @property
    def span_name(self) -> str:
        """``<system>.<operation> <target>``, e.g. ``db.get blog_post``."""
        target = self.target
        return (
            f"{self.system}.{self.operation} {target}"
            if target
            else f"{self.system}.{self.operation}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _DbEffect(Effect):
    system: ClassVar[str] = "db"
    table: str

    @property
    def target(self) -> str:
        return self.name or self.table


@dataclass(frozen=True, slots=True, kw_only=True)
class DbGet(_DbEffect):
    """Read the JSON value stored under ``key`` in ``table`` (``None`` when absent)."""

    operation: ClassVar[str] = "get"
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DbPut(_DbEffect):
    """Store ``value`` (JSON-serialisable) under ``key`` in ``table``, replacing any old value."""

    operation: ClassVar[str] = "put"
    key: str
    value: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class DbDel(_DbEffect):
    """Delete ``key`` from ``table``; the result is whether a row was deleted."""

    operation: ClassVar[str] = "del"
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DbQuery(_DbEffect):
    """Values in ``table`` whose JSON fields equal ``where``; optional order and limit.

    ``order_by`` names a JSON field (prefix ``-`` for descending). The result
    is a list of the stored values.
    """

    operation: ClassVar[str] = "query"
    where: Mapping[str, Any] = field(default_factory=dict)
    order_by: str | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _CacheEffect(Effect):
    system: ClassVar[str] = "cache"
    namespace: str
    key: str

    @property
    def target(self) -> str:
        return self.name or self.namespace


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheGet(_CacheEffect):
    """Read ``key`` from the cache namespace; ``None`` on a miss."""

    operation: ClassVar[str] = "get"


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSet(_CacheEffect):
    """Store ``value`` for ``ttl_ms`` milliseconds (``None``: the cache's default TTL)."""

    operation: ClassVar[str] = "set"
    value: Any
    ttl_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheDel(_CacheEffect):
    """Remove ``key`` from the cache namespace."""

    operation: ClassVar[str] = "del"


@dataclass(frozen=True, slots=True, kw_only=True)
class _HttpEffect(Effect):
    system: ClassVar[str] = "http"
    url: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def target(self) -> str:
        if self.name:
            return self.name
        # host[:port] without credentials; the path stays out of the span name.
        rest = self.url.split("://", 1)[-1]
        return rest.split("/", 1)[0].rsplit("@", 1)[-1]


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpGet(_HttpEffect):
    """``GET url``; the result is an :class:`HttpResult`."""

    operation: ClassVar[str] = "get"


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpDelete(_HttpEffect):
    """``DELETE url``; the result is an :class:`HttpResult`."""

    operation: ClassVar[str] = "delete"


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpPost(_HttpEffect):
    """``POST url`` with ``body`` (bytes) or ``json`` (encoded); result :class:`HttpResult`."""

    operation: ClassVar[str] = "post"
    body: bytes | None = None
    json: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpPut(_HttpEffect):
    """``PUT url`` with ``body`` (bytes) or ``json`` (encoded); result :class:`HttpResult`."""

    operation: ClassVar[str] = "put"
    body: bytes | None = None
    json: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResult:
    """The response an outbound HTTP effect received."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        import orjson

        return orjson.loads(self.body)
