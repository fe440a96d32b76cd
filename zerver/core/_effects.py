"""Effects: descriptions of I/O that steps ask for and interpreters perform.

An effect is an immutable value. It names what to do (``DbGet`` of a key in a
table), how patient to be (``timeout_ms``), whether the request depends on it
(``required``), how to retry (:class:`RetryPolicy`) and which slot receives the
result. It never performs the I/O itself.

Tracing protocol. An effect's CLIENT (or PRODUCER) span is named
``<system>.<operation> <target>`` and carries what the effect says of itself
through :meth:`Effect.span_attributes`, given the facts its interpreter
reported (``job.note``). The trace engine adds its own ``effect.*`` and
``job.*`` keys and the interpreter's static ``span_attributes``, and writes the
older names of the HTTP client conventions per ``ZER_VER_SEMCONV``; it knows
nothing of any one system. The built-in effects below use the same protocol.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ._attributes import MAX_KEY, client_url, printable
from ._slots import Slot

if TYPE_CHECKING:
    from ._attributes import AttrValue

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
    "effect_span_attributes",
]

#: The values of the ``effect.kind`` attribute; an effect of another system is ``other``.
EFFECT_KINDS = frozenset({"db", "http", "cache", "kv", "queue", "fs"})

#: What a job's span needs of its effect's class (class variables), in this order.
#: The exporter process receives these, ``required``, ``timeout_ms`` and the span
#: attributes, never the effect.
SPAN_FACTS = ("system", "operation", "effect_kind", "span_kind")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How failed attempts are retried: the one policy of effects, consumers and the exporter.

    Times are milliseconds. ``max_attempts`` counts the first try (1 = no
    retry, 3 = at most two retries); 0 sets no count, so only a deadline ends
    the retries: the exporter stops at its batch deadline, while an effect or a
    consumer, which have no overall deadline, treat 0 as 1. The back-off after
    failed attempt *n* is ``backoff_ms * multiplier**(n-1)``, capped at
    ``max_backoff_ms``, then shortened by a random fraction of up to ``jitter``
    (so the cap holds). A server's ``Retry-After`` replaces the computed
    back-off, floored at ``min_retry_after_ms`` so ``Retry-After: 0`` cannot
    spin. Only errors marked retryable (timeouts, connection errors, upstream
    5xx, HTTP 429/502/503/504 for the exporter) are retried.
    """

    max_attempts: int = 1
    backoff_ms: float = 10.0
    multiplier: float = 2.0
    max_backoff_ms: float = 1000.0
    jitter: float = 0.1
    min_retry_after_ms: float = 50.0

    def __post_init__(self) -> None:
        if self.max_attempts < 0:
            raise ValueError(
                f"max_attempts must be >= 0 (0: until the deadline), got {self.max_attempts}"
            )
        if self.backoff_ms < 0 or self.max_backoff_ms < 0 or self.min_retry_after_ms < 0:
            raise ValueError("back-off times must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, got {self.jitter}")

    def delay_ms(self, attempt: int, rnd: float) -> float:
        """Milliseconds to wait after failed attempt ``attempt`` (1-based); ``rnd`` is in [0, 1).

        Sans-I/O: the caller draws ``rnd``, so a test can pin it.
        """
        base = min(self.backoff_ms * self.multiplier ** (attempt - 1), self.max_backoff_ms)
        return max(base * (1.0 - self.jitter * rnd), 0.0)

    def backoff_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """:meth:`delay_ms` with ``rnd`` drawn from ``rng`` (Python's global ``random`` if None)."""
        return self.delay_ms(attempt, (rng or random).random() if self.jitter else 0.0)

    def gives_up(self, attempts: int) -> bool:
        """Whether no attempt follows the ``attempts`` made so far (0: only a deadline stops)."""
        return 0 < self.max_attempts <= attempts

    def backoff(self, retry: int, rnd: float) -> float:
        """Deprecated: :meth:`delay_ms` in seconds (the exporter's former ``RetryPolicy``)."""
        return self.delay_ms(retry, rnd) / 1000.0

    @property
    def min_retry_after_s(self) -> float:
        """Deprecated: ``min_retry_after_ms`` in seconds."""
        return self.min_retry_after_ms / 1000.0


NO_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class Effect:
    """Base of every effect. Subclasses set ``system`` and ``operation``.

    ``name`` overrides the target shown in the span name
    (``<system>.<operation> <target>``).

    What the effect's span says: ``target`` (the span name's last part),
    ``span_kind`` (``"client"``, or ``"producer"`` for an effect that sends a
    message), ``effect_kind`` (the ``effect.kind`` attribute: the system when it
    is one of :data:`EFFECT_KINDS`, else ``"other"``) and :meth:`span_attributes`.
    """

    system: ClassVar[str] = "other"
    operation: ClassVar[str] = "call"
    effect_kind: ClassVar[str] = "other"
    span_kind: ClassVar[Literal["client", "producer"]] = "client"

    slot: Slot[Any] | None = None
    timeout_ms: int = 1000
    required: bool = True
    retry: RetryPolicy = NO_RETRY
    name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Not super(): the slotted dataclass replaces this class, breaking its cell.
        super(Effect, cls).__init_subclass__(**kwargs)
        if "effect_kind" not in cls.__dict__:
            cls.effect_kind = cls.system if cls.system in EFFECT_KINDS else "other"

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

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        """This effect's own attributes on its span, in the order they should appear.

        ``result`` holds what the interpreter reported with ``job.note`` (None when
        it reported nothing). Keys follow the stable semantic conventions; the
        engine adds the older HTTP client keys per ``ZER_VER_SEMCONV``. An
        attribute never replaces one the engine (``effect.*``, ``job.*``) or the
        interpreter's static ``span_attributes`` already set, so a default such as
        ``db.system`` can be given here. Values are attribute values (str, bool,
        int, float, or lists of one of them).

        Called once per span after the job finished, in the process that ran the
        request (the exporter process receives the result), so it must be cheap
        and must not raise; if it does, the span says so in
        ``zerver.effect.attributes_error`` instead.
        """
        return {}


def effect_span_attributes(
    effect: Effect, result: Mapping[str, Any] | None
) -> dict[str, AttrValue]:
    """``effect.span_attributes(result)``; what it raised, as an attribute, if it raised."""
    try:
        return effect.span_attributes(result)
    except Exception as exc:  # telemetry never breaks the request
        return {"zerver.effect.attributes_error": type(exc).__qualname__}


#: Facts a ``db`` interpreter may note (``job.note``) that go on the span as they are.
_DB_STATEMENT_FACTS = ("db.collection.name", "db.operation.name", "db.query.text")


@dataclass(frozen=True, slots=True, kw_only=True)
class _DbEffect(Effect):
    system: ClassVar[str] = "db"
    table: str

    @property
    def target(self) -> str:
        return self.name or self.table

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        attrs: dict[str, AttrValue] = {
            "db.system": "other_sql",
            "db.operation": self.operation,
            "db.namespace": self.table,
        }
        key = getattr(self, "key", None)  # DbQuery has none
        if key.__class__ is str:
            attrs["db.key"] = key if len(key) <= MAX_KEY and key.isprintable() else printable(key)
        if result:
            rows = result.get("db.rows")
            if isinstance(rows, int):
                attrs["db.response.returned_rows"] = rows
            # The statement, as an interpreter that runs SQL text reports it (PostgreSQL).
            for fact in _DB_STATEMENT_FACTS:
                if (value := result.get(fact)).__class__ is str:
                    attrs[fact] = value
        return attrs


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


_NOT_NOTED = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class _CacheEffect(Effect):
    system: ClassVar[str] = "cache"
    namespace: str
    key: str

    @property
    def target(self) -> str:
        return self.name or self.namespace

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        hit = result.get("cache.hit", _NOT_NOTED) if result is not None else _NOT_NOTED
        if hit is _NOT_NOTED:
            return {"cache.system": "other", "cache.operation": self.operation}
        return {
            "cache.system": "other",
            "cache.operation": self.operation,
            "cache.hit": hit if hit.__class__ is bool else bool(hit),
        }


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

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        # url.full without credentials or query values; the host and port it names.
        url, address, port = client_url(self.url)
        attrs: dict[str, AttrValue] = {
            "http.request.method": self.operation.upper(),
            "url.full": url,
        }
        if address:
            attrs["server.address"] = address
        attrs["server.port"] = port
        if result:
            status = result.get("http.response.status_code")
            if isinstance(status, int):
                attrs["http.response.status_code"] = status
            size = result.get("http.response.body.size")
            if isinstance(size, int):
                attrs["http.response.body.size"] = size
            if len(result) > 2:  # captured headers (OTEL_INSTRUMENTATION_HTTP_CAPTURE_...)
                for key, value in result.items():
                    if key.startswith(_HEADER_PREFIXES) and isinstance(value, list):
                        attrs[key] = value
        return attrs


_HEADER_PREFIXES = ("http.request.header.", "http.response.header.")


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
