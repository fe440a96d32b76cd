"""Interpreters: the components that perform effects with real I/O.

* :class:`SqliteInterpreter` (system ``db``): SQLite, run off the event loop
  through a bounded connection pool.
* :class:`CacheInterpreter` (system ``cache``): an in-process TTL + LRU cache.
* :class:`HttpInterpreter` (system ``http``): outbound HTTP through httpx.
* :class:`PostgresInterpreter` (system ``db``): the same tables on a shared
  PostgreSQL server (``ZER_VER_DB_URL``).
* :class:`RedisCacheInterpreter` (system ``cache``): the same cache on a shared
  Redis server (``ZER_VER_CACHE_URL``).
"""

from ._cache import CacheInterpreter, CacheStats
from ._httpclient import HeadersHook, HttpInterpreter
from ._postgres import PostgresInterpreter
from ._redis import RedisCacheInterpreter
from ._sqlite import SqliteInterpreter

__all__ = [
    "CacheInterpreter",
    "CacheStats",
    "HeadersHook",
    "HttpInterpreter",
    "PostgresInterpreter",
    "RedisCacheInterpreter",
    "SqliteInterpreter",
]
