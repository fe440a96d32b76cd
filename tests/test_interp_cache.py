"""The cache interpreters: one effect-level suite for the in-process cache and Redis,
then the in-process cache's own rules (TTL on a virtual clock, LRU bounds, counters)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer, redis_server  # noqa: F401 (a fixture)

from zerver.core._clock import VirtualClock
from zerver.core._effects import CacheDel, CacheGet, CacheSet, DbGet, Effect
from zerver.core._errors import EffectError
from zerver.runtime._park import JobContext
from zerver.runtime.interpreters import CacheInterpreter, CacheStats, RedisCacheInterpreter
from zerver.trace._records import JobState

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def make_job(effect: Effect, clock: VirtualClock) -> JobContext:
    state = JobState(
        index=0, kind="effect", name=effect.span_name, queue="effects", step_index=0, effect=effect
    )
    return JobContext(state, clock)


async def run(
    cache: CacheInterpreter | RedisCacheInterpreter, effect: Effect, clock: VirtualClock
) -> tuple[Any, JobState]:
    job = make_job(effect, clock)
    return await cache.perform(effect, job), job.state


AnyCache = CacheInterpreter | RedisCacheInterpreter


@pytest.fixture(params=["in_process", "redis"])
async def cache(request: pytest.FixtureRequest, clock: VirtualClock) -> AsyncIterator[AnyCache]:
    """A started cache of each kind; the Redis one keeps its keys apart from other tests'."""
    interp: AnyCache
    if request.param == "in_process":
        interp = CacheInterpreter(clock=clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        interp = RedisCacheInterpreter(server.url, key_prefix=f"test-{uuid.uuid4().hex[:12]}:")
    await interp.start()
    try:
        yield interp
    finally:
        await interp.aclose()


def hits_and_misses(cache: AnyCache) -> tuple[int, int]:
    if isinstance(cache, CacheInterpreter):
        return cache.stats.hits, cache.stats.misses
    return cache.hits, cache.misses


# -- the effects, on every cache ------------------------------------------------


async def test_get_set_del_and_hit_notes(cache: AnyCache, clock: VirtualClock) -> None:
    value, state = await run(cache, CacheGet(namespace="author", key="7"), clock)
    assert value is None
    assert state.result_meta == {"cache.hit": False}

    result, state = await run(
        cache, CacheSet(namespace="author", key="7", value={"name": "Ann"}), clock
    )
    assert result is None
    assert state.result_meta is None

    value, state = await run(cache, CacheGet(namespace="author", key="7"), clock)
    assert value == {"name": "Ann"}
    assert state.result_meta == {"cache.hit": True}
    if isinstance(cache, CacheInterpreter):
        assert state.park_episodes == []  # pure in-memory: nothing ever parks
    else:
        assert [(p.cause, p.token) for p in state.park_episodes] == [("io_wait", "redis")]

    assert (await run(cache, CacheDel(namespace="author", key="7"), clock))[0] is True
    assert (await run(cache, CacheDel(namespace="author", key="7"), clock))[0] is False
    assert (await run(cache, CacheGet(namespace="author", key="7"), clock))[0] is None
    assert hits_and_misses(cache) == (1, 2)


async def test_in_process_counters(clock: VirtualClock) -> None:
    cache = CacheInterpreter(clock=clock)
    await run(cache, CacheGet(namespace="author", key="7"), clock)
    await run(cache, CacheSet(namespace="author", key="7", value=1), clock)
    await run(cache, CacheGet(namespace="author", key="7"), clock)
    await run(cache, CacheDel(namespace="author", key="7"), clock)
    await run(cache, CacheGet(namespace="author", key="7"), clock)
    assert cache.stats == CacheStats(entries=0, hits=1, misses=2, evictions=0, expirations=0)
    assert cache.stats.hit_ratio == pytest.approx(1 / 3)


async def test_namespaces_are_separate(cache: AnyCache, clock: VirtualClock) -> None:
    await run(cache, CacheSet(namespace="a", key="k", value=1), clock)
    await run(cache, CacheSet(namespace="b", key="k", value=2), clock)
    # A namespace and key that would join to the same text stay apart too.
    await run(cache, CacheSet(namespace="a:k", key="x", value=3), clock)
    await run(cache, CacheSet(namespace="a", key="k:x", value=4), clock)
    assert (await run(cache, CacheGet(namespace="a", key="k"), clock))[0] == 1
    assert (await run(cache, CacheGet(namespace="b", key="k"), clock))[0] == 2
    assert (await run(cache, CacheGet(namespace="a:k", key="x"), clock))[0] == 3
    assert (await run(cache, CacheGet(namespace="a", key="k:x"), clock))[0] == 4


VALUES = [
    {"name": "Ann", "tags": ["a", "b"], "age": 41, "score": 0.5, "admin": False, "boss": None},
    [1, "two", 3.0],
    "text with ünïcode",
    0,
    None,
    True,
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
async def test_values_read_back_equal(cache: AnyCache, clock: VirtualClock, value: Any) -> None:
    await run(cache, CacheSet(namespace="v", key="k", value=value), clock)
    got, state = await run(cache, CacheGet(namespace="v", key="k"), clock)
    assert got == value and type(got) is type(value)
    # A cached None is a hit, not a miss.
    assert state.result_meta == {"cache.hit": True}


async def test_set_overwrites(cache: AnyCache, clock: VirtualClock) -> None:
    await run(cache, CacheSet(namespace="n", key="k", value="old"), clock)
    await run(cache, CacheSet(namespace="n", key="k", value="new"), clock)
    assert (await run(cache, CacheGet(namespace="n", key="k"), clock))[0] == "new"


async def test_ttl_expiry_on_virtual_clock(clock: VirtualClock) -> None:
    cache = CacheInterpreter(default_ttl_ms=1000, clock=clock)
    await run(cache, CacheSet(namespace="n", key="short", value="s", ttl_ms=100), clock)
    await run(cache, CacheSet(namespace="n", key="default", value="d"), clock)

    clock.advance_ms(99.999)
    assert (await run(cache, CacheGet(namespace="n", key="short"), clock))[0] == "s"
    clock.advance_ms(0.001)
    value, state = await run(cache, CacheGet(namespace="n", key="short"), clock)
    assert value is None
    assert state.result_meta == {"cache.hit": False}
    assert cache.stats.expirations == 1

    clock.advance_ms(899)
    assert (await run(cache, CacheGet(namespace="n", key="default"), clock))[0] == "d"
    clock.advance_ms(1)
    assert (await run(cache, CacheGet(namespace="n", key="default"), clock))[0] is None
    assert cache.stats == CacheStats(entries=0, hits=2, misses=2, evictions=0, expirations=2)


def test_set_refreshes_ttl_and_deleting_expired_is_false(clock: VirtualClock) -> None:
    cache = CacheInterpreter(default_ttl_ms=100, clock=clock)
    cache.set("n", "k", 1)
    clock.advance_ms(90)
    cache.set("n", "k", 2)
    clock.advance_ms(90)
    assert cache.get("n", "k") == (True, 2)
    clock.advance_ms(10)
    assert cache.delete("n", "k") is False
    assert cache.stats.expirations == 1
    assert len(cache) == 0


async def test_lru_eviction_order(clock: VirtualClock) -> None:
    cache = CacheInterpreter(max_entries=3, clock=clock)
    for key in "abc":
        await run(cache, CacheSet(namespace="n", key=key, value=key), clock)
    # Reading "a" makes "b" the least recently used.
    assert (await run(cache, CacheGet(namespace="n", key="a"), clock))[0] == "a"
    await run(cache, CacheSet(namespace="n", key="d", value="d"), clock)
    assert len(cache) == 3
    assert cache.stats.evictions == 1
    assert cache.get("n", "b") == (False, None)
    # Overwriting an existing key evicts nothing but refreshes its recency.
    cache.set("n", "c", "C")
    cache.set("n", "e", "e")
    assert cache.get("n", "a") == (False, None)
    assert [cache.get("n", k) for k in "cde"] == [(True, "C"), (True, "d"), (True, "e")]
    assert cache.stats.evictions == 2


def test_expired_victims_count_as_expirations(clock: VirtualClock) -> None:
    cache = CacheInterpreter(max_entries=2, clock=clock)
    cache.set("n", "old", 1, ttl_ms=10)
    cache.set("n", "live", 2, ttl_ms=1000)
    clock.advance_ms(10)
    cache.set("n", "new", 3)
    assert cache.stats.evictions == 0
    assert cache.stats.expirations == 1
    assert cache.get("n", "live") == (True, 2)


@pytest.mark.parametrize("ttl_ms", [0, -5, True, "10"])
async def test_invalid_ttl(cache: AnyCache, clock: VirtualClock, ttl_ms: Any) -> None:
    with pytest.raises(EffectError) as info:
        await run(cache, CacheSet(namespace="n", key="k", value=1, ttl_ms=ttl_ms), clock)
    assert info.value.kind == "invalid_ttl"
    assert repr(ttl_ms) in str(info.value)
    assert (await run(cache, CacheGet(namespace="n", key="k"), clock))[0] is None


async def test_unsupported_effect(cache: AnyCache, clock: VirtualClock) -> None:
    with pytest.raises(EffectError) as info:
        await run(cache, DbGet(table="t", key="k"), clock)
    assert info.value.kind == "unsupported_effect"


# -- time to live ----------------------------------------------------------------


async def test_redis_ttl_is_set_on_the_server(redis_server: RedisServer) -> None:  # noqa: F811
    """Redis keeps the TTL (``PX``): the default, an explicit one, a fraction rounded up."""
    import redis.asyncio

    clock = VirtualClock()
    cache = RedisCacheInterpreter(
        redis_server.url, default_ttl_ms=5000, key_prefix=f"test-{uuid.uuid4().hex[:12]}:"
    )
    raw = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await run(cache, CacheSet(namespace="n", key="default", value=1), clock)
        await run(cache, CacheSet(namespace="n", key="given", value=1, ttl_ms=700), clock)
        await run(cache, CacheSet(namespace="n", key="fraction", value=1, ttl_ms=0.2), clock)  # type: ignore[arg-type]
        assert 0 < await raw.pttl(cache.redis_key("n", "default")) <= 5000
        assert 0 < await raw.pttl(cache.redis_key("n", "given")) <= 700
        assert await raw.pttl(cache.redis_key("n", "fraction")) in (-2, 0, 1)  # 1 ms, rounded up
    finally:
        await raw.aclose()
        await cache.aclose()


async def test_redis_entry_expires(redis_server: RedisServer) -> None:  # noqa: F811
    """An entry set for 1 ms reads as a miss once Redis has dropped it (bounded wait)."""
    clock = VirtualClock()
    cache = RedisCacheInterpreter(redis_server.url, key_prefix=f"test-{uuid.uuid4().hex[:12]}:")
    try:
        await run(cache, CacheSet(namespace="n", key="k", value="v", ttl_ms=1), clock)
        with anyio.fail_after(5):
            for _ in range(500):
                value, state = await run(cache, CacheGet(namespace="n", key="k"), clock)
                if value is None:
                    break
                await anyio.sleep(0.01)
        assert value is None and state.result_meta == {"cache.hit": False}
    finally:
        await cache.aclose()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        CacheInterpreter(max_entries=0)
    with pytest.raises(ValueError, match="default_ttl_ms"):
        CacheInterpreter(default_ttl_ms=0)


class DictModel:
    """The cache's rules written as plainly as possible: a dict kept in recency order."""

    def __init__(self, max_entries: int, clock: VirtualClock) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.entries: dict[tuple[str, str], tuple[int, int]] = {}

    def get(self, k: tuple[str, str]) -> tuple[bool, int | None]:
        if k not in self.entries:
            return False, None
        value, expires = self.entries.pop(k)
        if self.clock.now_ns() >= expires:
            return False, None
        self.entries[k] = (value, expires)
        return True, value

    def set(self, k: tuple[str, str], value: int, ttl_ms: int) -> None:
        if k in self.entries:
            del self.entries[k]
        elif len(self.entries) >= self.max_entries:
            del self.entries[next(iter(self.entries))]
        self.entries[k] = (value, self.clock.now_ns() + ttl_ms * 1_000_000)

    def delete(self, k: tuple[str, str]) -> bool:
        entry = self.entries.pop(k, None)
        return entry is not None and self.clock.now_ns() < entry[1]


keys = st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["1", "2", "3", "4", "5"]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("set"), keys, st.integers(0, 99), st.integers(1, 50)),
        st.tuples(st.just("del"), keys),
        st.tuples(st.just("tick"), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(max_entries=st.integers(1, 6), operations=ops)
def test_cache_agrees_with_dict_model(max_entries: int, operations: list[tuple[Any, ...]]) -> None:
    clock = VirtualClock()
    cache = CacheInterpreter(max_entries=max_entries, default_ttl_ms=20, clock=clock)
    model = DictModel(max_entries, clock)
    hits = 0
    for op in operations:
        match op:
            case ("get", (ns, key)):
                expected = model.get((ns, key))
                hits += expected[0]
                assert cache.get(ns, key) == expected
            case ("set", (ns, key), value, ttl_ms):
                cache.set(ns, key, value, ttl_ms)
                model.set((ns, key), value, ttl_ms)
            case ("del", (ns, key)):
                assert cache.delete(ns, key) == model.delete((ns, key))
            case ("tick", ms):
                clock.advance_ms(ms)
        assert len(cache) <= max_entries
        assert len(cache) == len(model.entries)
    # Every key the model still holds unexpired reads back identically.
    for (ns, key), (value, expires) in list(model.entries.items()):
        if clock.now_ns() < expires:
            assert cache.get(ns, key) == (True, value)
            hits += 1
    assert cache.stats.hits == hits


async def test_redis_pool_wait_parks_backpressure(redis_server: RedisServer) -> None:  # noqa: F811
    """With every connection busy, an effect parks ``backpressure`` / ``cache_pool``
    with the pool's current and maximum, then ``io_wait`` / ``redis`` for its command."""
    clock = VirtualClock()
    cache = RedisCacheInterpreter(
        redis_server.url, pool_size=1, key_prefix=f"test-{uuid.uuid4().hex[:12]}:"
    )
    await cache.start()
    effect = CacheGet(namespace="n", key="k")
    job = make_job(effect, clock)
    try:
        await cache.limiter.acquire()  # the one connection is busy
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.perform, effect, job)
            await anyio.wait_all_tasks_blocked()
            assert cache.limiter.waiting == 1
            cache.limiter.release()
    finally:
        await cache.aclose()
    episodes = [(p.cause, p.token, p.limit_current, p.limit_max) for p in job.state.park_episodes]
    assert episodes == [("backpressure", "cache_pool", 1, 1), ("io_wait", "redis", None, None)]
