"""Interpreters: the components that perform effects with real I/O.

* :class:`SqliteInterpreter` (system ``db``): SQLite, run off the event loop
  through a bounded connection pool.
* :class:`CacheInterpreter` (system ``cache``): an in-process TTL + LRU cache.
* :class:`HttpInterpreter` (system ``http``): outbound HTTP through httpx.
"""

from ._cache import CacheInterpreter, CacheStats
from ._httpclient import HeadersHook, HttpInterpreter
from ._sqlite import SqliteInterpreter

__all__ = [
    "CacheInterpreter",
    "CacheStats",
    "HeadersHook",
    "HttpInterpreter",
    "SqliteInterpreter",
]
