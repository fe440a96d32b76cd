"""The in-process cache interpreter: a bounded TTL + LRU map.

Rules of the cache (a synchronous core; ``perform`` is a thin async wrapper):

* Entries are keyed by ``(namespace, key)`` and expire ``ttl_ms`` after they
  were set, measured on the injected clock (``now_ns``). An entry is expired
  once ``now >= expires``.
* Expired entries are dropped lazily, when a read or an eviction meets them;
  each such drop counts as an *expiration*.
* The cache never holds more than ``max_entries``: setting a new key when full
  drops the least recently used entry (reads and writes both count as use),
  counted as an *eviction* (or as an expiration if it had already expired).
* Values are stored as given, not copied: treat cached values as immutable.
* Nothing here waits, so nothing parks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from zerver.core._clock import Clock, MonotonicClock
from zerver.core._effects import CacheDel, CacheGet, CacheSet, Effect
from zerver.core._errors import EffectError, UnsupportedEffectError
from zerver.runtime._park import JobContext

__all__ = ["CacheInterpreter", "CacheStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStats:
    """A snapshot of a cache's counters."""

    entries: int
    hits: int
    misses: int
    evictions: int
    expirations: int

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups (0.0 before the first lookup)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class CacheInterpreter:
    """Performs ``cache`` effects (``CacheGet``, ``CacheSet``, ``CacheDel``) in process.

    ``max_entries`` bounds the cache (least recently used entries go first);
    ``default_ttl_ms`` applies when a ``CacheSet`` gives no ``ttl_ms``.
    """

    system = "cache"
    #: It makes no OpenTelemetry spans of its own, and never waits (see ``Interpreter``).
    otel_spans: ClassVar[bool] = False
    synchronous: ClassVar[bool] = True
    #: Static attributes of every span this interpreter's effects produce.
    span_attributes: ClassVar[dict[str, str]] = {"cache.system": "in_process"}

    __slots__ = (
        "_clock",
        "_entries",
        "_evictions",
        "_expirations",
        "_hits",
        "_misses",
        "default_ttl_ms",
        "max_entries",
    )

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        default_ttl_ms: int = 60_000,
        clock: Clock | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if default_ttl_ms <= 0:
            raise ValueError(f"default_ttl_ms must be > 0, got {default_ttl_ms}")
        self.max_entries = max_entries
        self.default_ttl_ms = default_ttl_ms
        self._clock: Clock = clock or MonotonicClock()
        # (namespace, key) -> (value, expires_ns); order is least to most recently used.
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0

    def __repr__(self) -> str:
        return f"<CacheInterpreter {len(self._entries)}/{self.max_entries} entries>"

    def __len__(self) -> int:
        """Entries held, including expired ones not yet dropped."""
        return len(self._entries)

    @property
    def stats(self) -> CacheStats:
        """Current counters (a snapshot)."""
        return CacheStats(
            entries=len(self._entries),
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
        )

    # -- synchronous core ----------------------------------------------------

    def get(self, namespace: str, key: str) -> tuple[bool, Any]:
        """``(hit, value)`` for ``key``; a hit makes it the most recently used entry."""
        entry_key = (namespace, key)
        entry = self._entries.get(entry_key)
        if entry is None:
            self._misses += 1
            return False, None
        value, expires_ns = entry
        if self._clock.now_ns() >= expires_ns:
            del self._entries[entry_key]
            self._expirations += 1
            self._misses += 1
            return False, None
        self._entries.move_to_end(entry_key)
        self._hits += 1
        return True, value

    def set(self, namespace: str, key: str, value: Any, ttl_ms: int | None = None) -> None:
        """Store ``value`` for ``ttl_ms`` (default: ``default_ttl_ms``), evicting if full."""
        ttl = self.default_ttl_ms if ttl_ms is None else ttl_ms
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise EffectError(
                f"cache ttl_ms for key {key!r} in namespace {namespace!r} must be > 0, "
                f"got {ttl_ms!r}",
                kind="invalid_ttl",
                status_hint=500,
            )
        now = self._clock.now_ns()
        entry_key = (namespace, key)
        entries = self._entries
        if entry_key in entries:
            entries.move_to_end(entry_key)
        else:
            while len(entries) >= self.max_entries:
                _, (_, expires_ns) = entries.popitem(last=False)
                if now >= expires_ns:
                    self._expirations += 1
                else:
                    self._evictions += 1
        entries[entry_key] = (value, now + round(ttl * 1_000_000))

    def delete(self, namespace: str, key: str) -> bool:
        """Remove ``key``; whether a live (unexpired) entry was removed."""
        entry = self._entries.pop((namespace, key), None)
        if entry is None:
            return False
        if self._clock.now_ns() >= entry[1]:
            self._expirations += 1
            return False
        return True

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()

    # -- interpreter ---------------------------------------------------------

    async def start(self) -> None:
        """Nothing to open."""

    async def aclose(self) -> None:
        """Drop every entry."""
        self.clear()

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        """Perform one ``cache`` effect: get → value or ``None``, set → ``None``, del → bool."""
        if isinstance(effect, CacheGet):
            hit, value = self.get(effect.namespace, effect.key)
            job.note("cache.hit", hit)
            return value
        if isinstance(effect, CacheSet):
            self.set(effect.namespace, effect.key, effect.value, effect.ttl_ms)
            return None
        if isinstance(effect, CacheDel):
            return self.delete(effect.namespace, effect.key)
        raise UnsupportedEffectError("CacheInterpreter", effect)
