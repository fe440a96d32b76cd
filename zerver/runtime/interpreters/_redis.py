"""The Redis cache interpreter, and what it shares with the Redis Streams broker.

Rules of the Redis cache (the same effects and results as the in-process cache):

* ``CacheGet`` → the stored value or ``None`` (noted ``cache.hit``); ``CacheSet``
  → ``None``; ``CacheDel`` → whether a live entry was removed.
* An entry lives ``ttl_ms`` (default ``default_ttl_ms``) as Redis measures it:
  ``SET ... PX``, so every process sharing the server sees it expire at once.
  A TTL that is not a number > 0 fails the effect (``invalid_ttl``) as in process.
* Keys are ``<key_prefix><namespace>:<key>``, with ``%`` and ``:`` escaped in
  the namespace so that no two (namespace, key) pairs share a Redis key.
* Values travel as JSON (orjson): what a step caches must be JSON-serialisable
  (``bytes`` are kept as bytes). A tuple reads back as a list, as it would from
  the database. Anything else fails the effect (``invalid_value``).
* Bounds: at most ``pool_size`` commands in flight (a ConcurrencyLimiter named
  ``cache_pool``: a job that waits for a connection parks ``backpressure``);
  the entry count is bounded by the server's ``maxmemory`` policy, not here.
* Failures are effect failures, never hangs: a refused or lost connection is
  ``cache_unavailable``, a server that does not answer within ``timeout_ms``
  is ``cache_timeout`` (both retryable, 503), a refused password is
  ``cache_auth``, any other server error ``cache_error``. The client does not
  retry on its own: the effect's retry policy decides. The next effect after
  the server is back opens a fresh connection.
* The URL's password is masked (``***``) in every message and never reaches a
  span: spans carry ``server.address`` and ``server.port`` only.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import orjson

from zerver._config import mask_url
from zerver.core._effects import CacheDel, CacheGet, CacheSet, Effect
from zerver.core._errors import ConfigError, EffectError, UnsupportedEffectError
from zerver.runtime._park import ConcurrencyLimiter, JobContext

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool, Redis

__all__ = ["RedisCacheInterpreter", "RedisTarget", "redis_client", "redis_failure"]

_SCHEMES = ("redis", "rediss")
_ACCEPTED = "accepted: redis://[user:password@]host[:port][/db] or rediss://... (TLS)"


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisTarget:
    """A parsed ``redis://`` URL: where it points, and how it may be shown."""

    url: str
    masked: str
    host: str
    port: int
    db: int

    @classmethod
    def parse(cls, url: str, *, variable: str = "url") -> RedisTarget:
        """Parse ``url``; a bad one raises :class:`ConfigError` naming ``variable``
        and the URL with its password masked."""
        masked = mask_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port or 6379
        except ValueError:
            raise ConfigError(f"{variable}={masked!r} is invalid: {_ACCEPTED}") from None
        path = parts.path.strip("/")
        if parts.scheme not in _SCHEMES or not parts.hostname or not (path or "0").isdigit():
            raise ConfigError(f"{variable}={masked!r} is invalid: {_ACCEPTED}")
        if importlib.util.find_spec("redis") is None:
            raise ConfigError(
                f"{variable}={masked!r} needs the Redis client: pip install 'zerver[redis]'"
            )
        return cls(url=url, masked=masked, host=parts.hostname, port=port, db=int(path or "0"))

    @property
    def span_attributes(self) -> dict[str, str | int]:
        """What every span of an effect on this server says of it (no credentials)."""
        return {
            "db.system.name": "redis",
            "db.system": "redis",
            "db.namespace": str(self.db),
            "server.address": self.host,
            "server.port": self.port,
        }


def redis_client(
    target: RedisTarget, *, max_connections: int, timeout_ms: int
) -> tuple[Redis, ConnectionPool]:
    """A client on a bounded pool: connect and command timeouts of ``timeout_ms``,
    and no retries of its own (the caller's policy retries)."""
    from redis.asyncio import ConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    timeout_s = timeout_ms / 1000.0
    pool = ConnectionPool.from_url(
        target.url,
        max_connections=max_connections,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return Redis(connection_pool=pool), pool


def redis_failure(exc: Exception, what: str, target: RedisTarget, *, prefix: str) -> EffectError:
    """The effect failure for a redis-py exception: ``<prefix>_unavailable``,
    ``<prefix>_timeout``, ``<prefix>_auth`` or ``<prefix>_error``, naming the
    server by its masked URL."""
    from redis import exceptions as rx

    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        kind, status, retryable = f"{prefix}_auth", 500, False
    elif isinstance(exc, rx.TimeoutError | TimeoutError):
        kind, status, retryable = f"{prefix}_timeout", 503, True
    elif isinstance(exc, rx.ConnectionError | OSError):
        kind, status, retryable = f"{prefix}_unavailable", 503, True
    else:
        kind, status, retryable = f"{prefix}_error", 500, False
    detail = str(exc).replace(target.url, target.masked) or type(exc).__name__
    return EffectError(
        f"redis at {target.masked}: {what} failed ({kind}): {detail}",
        kind=kind,
        status_hint=status,
        retryable=retryable,
    )


def _escape(namespace: str) -> str:
    return namespace.replace("%", "%25").replace(":", "%3A")


def _encode(value: Any, namespace: str, key: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return b"b" + bytes(value)
    try:
        return b"j" + orjson.dumps(value)
    except TypeError as exc:
        raise EffectError(
            f"cache value for key {key!r} in namespace {namespace!r} is not "
            f"JSON-serialisable: {exc}",
            kind="invalid_value",
            status_hint=500,
        ) from None


def _decode(raw: bytes) -> Any:
    tag, body = raw[:1], raw[1:]
    if tag == b"b":
        return body
    if tag == b"j":
        return orjson.loads(body)
    # Written by something else: hand over the bytes rather than guess.
    return raw


class RedisCacheInterpreter:
    """Performs ``cache`` effects (``CacheGet``, ``CacheSet``, ``CacheDel``) on a Redis server.

    ``url`` is ``redis://[user:password@]host[:port][/db]`` (``rediss://`` for
    TLS); ``default_ttl_ms`` applies when a ``CacheSet`` gives no ``ttl_ms``;
    ``timeout_ms`` bounds connecting and each command; ``pool_size`` bounds the
    connections (and the commands in flight).
    """

    system = "cache"
    otel_spans: ClassVar[bool] = False

    def __init__(
        self,
        url: str,
        *,
        default_ttl_ms: int = 60_000,
        key_prefix: str = "zerver:cache:",
        pool_size: int = 16,
        timeout_ms: int = 1000,
        variable: str = "url",
    ) -> None:
        if default_ttl_ms <= 0:
            raise ValueError(f"default_ttl_ms must be > 0, got {default_ttl_ms}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0, got {timeout_ms}")
        self.target = RedisTarget.parse(url, variable=variable)
        self.default_ttl_ms = default_ttl_ms
        self.key_prefix = key_prefix
        self.pool_size = pool_size
        self.timeout_ms = timeout_ms
        self.limiter = ConcurrencyLimiter("cache_pool", pool_size)
        #: Static attributes of every span this interpreter's effects produce.
        self.span_attributes: dict[str, str | int] = {
            "cache.system": "redis",
            **self.target.span_attributes,
        }
        self.hits = 0
        self.misses = 0
        self.failures = 0
        self._client: Redis | None = None
        self._pool: ConnectionPool | None = None

    def __repr__(self) -> str:
        return f"<RedisCacheInterpreter {self.target.masked}>"

    def redis_key(self, namespace: str, key: str) -> str:
        """The Redis key holding ``key`` of ``namespace``."""
        return f"{self.key_prefix}{_escape(namespace)}:{key}"

    def _connect(self) -> Redis:
        if self._client is None:
            self._client, self._pool = redis_client(
                self.target, max_connections=self.pool_size, timeout_ms=self.timeout_ms
            )
        return self._client

    async def start(self) -> None:
        """Open the pool and check that the server answers; raises ``EffectError``
        (``cache_unavailable``, ``cache_auth``, ...) naming the masked URL if not."""
        client = self._connect()
        try:
            await client.ping()
        except Exception as exc:
            raise redis_failure(exc, "connecting", self.target, prefix="cache") from None

    async def aclose(self) -> None:
        """Close every connection (the entries stay on the server)."""
        client, self._client, self._pool = self._client, None, None
        if client is not None:
            await client.aclose(close_connection_pool=True)

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        """Perform one ``cache`` effect: get → value or ``None``, set → ``None``, del → bool."""
        if isinstance(effect, CacheGet):
            name = self.redis_key(effect.namespace, effect.key)
            raw = await self._call(job, effect, "GET", name)
            hit = raw is not None
            if hit:
                self.hits += 1
            else:
                self.misses += 1
            job.note("cache.hit", hit)
            return _decode(raw) if hit else None
        if isinstance(effect, CacheSet):
            ttl = self.default_ttl_ms if effect.ttl_ms is None else effect.ttl_ms
            if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
                raise EffectError(
                    f"cache ttl_ms for key {effect.key!r} in namespace {effect.namespace!r} "
                    f"must be > 0, got {effect.ttl_ms!r}",
                    kind="invalid_ttl",
                    status_hint=500,
                )
            body = _encode(effect.value, effect.namespace, effect.key)
            name = self.redis_key(effect.namespace, effect.key)
            # Whole milliseconds, rounded up so that no entry lives shorter than asked.
            await self._call(job, effect, "SET", name, body, "PX", max(1, math.ceil(ttl)))
            return None
        if isinstance(effect, CacheDel):
            name = self.redis_key(effect.namespace, effect.key)
            return bool(await self._call(job, effect, "DEL", name))
        raise UnsupportedEffectError("RedisCacheInterpreter", effect)

    async def _call(self, job: JobContext, effect: Effect, *command: Any) -> Any:
        client = self._connect()
        async with self.limiter.slot(job):
            try:
                with job.parked("io_wait", "redis"):
                    # Replies are loosely typed in redis-py; ours are checked where read.
                    return await client.execute_command(*command)  # type: ignore[no-untyped-call]
            except Exception as exc:
                self.failures += 1
                raise redis_failure(exc, effect.span_name, self.target, prefix="cache") from None
