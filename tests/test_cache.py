"""gateway.cache: item keys, the in-process LRU, and the Redis cache against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import pytest
import redis

from gateway.cache import MemoryCache, RedisCache, create_cache, item_keys, key_namespace
from tests.redis_server import REDIS_SERVER, free_port, running_redis


def _key(
    service: str = "embedding_service",
    fingerprint: str = "minilm-abc123",
    params: dict[str, object] | None = None,
    item: str = "hello world",
) -> str:
    chosen = {"normalize": True, "dimensions": 384} if params is None else params
    return item_keys(key_namespace(service, fingerprint, chosen), [item])[0]


def test_item_keys_changes_when_any_input_changes() -> None:
    keys = [
        _key(),
        _key(service="rerank_service"),
        _key(fingerprint="minilm-def456"),
        _key(item="hello world "),
        _key(params={"normalize": False, "dimensions": 384}),
        _key(params={"normalize": True, "dimensions": 256}),
        _key(params={"normalize": True}),
        _key(params={"normalize": True, "dimensions": 384, "query": "q"}),
    ]
    assert len(set(keys)) == len(keys)


def test_item_keys_is_stable_when_computed_in_another_run_or_param_order() -> None:
    # The same value as any other process computed, on any machine: a golden hash, not hash()
    recipe = (b'{"fingerprint":"minilm-abc123","params":{"dimensions":384,"normalize":true},'
              b'"service":"embedding_service","v":2}hello world')
    golden = "4ef7ed6f8ee25af86919f4d35db65d5106076110ec66ed7ea54708f4d32535d5"
    assert hashlib.sha256(recipe).hexdigest() == golden
    assert _key() == golden
    assert _key(params={"dimensions": 384, "normalize": True}) == golden


def test_item_keys_raises_when_params_are_not_json() -> None:
    with pytest.raises(TypeError):
        _key(params={"normalize": object()})
    with pytest.raises(ValueError):
        _key(params={"temperature": float("nan")})


def test_memory_cache_evicts_least_recently_used_when_full() -> None:
    async def scenario() -> list[bytes | None]:
        cache = MemoryCache(max_items=3)
        await cache.set_many({"a": b"1", "b": b"2", "c": b"3"})
        await cache.get_many(["a"])  # a is now the most recently used; b the least
        await cache.set_many({"d": b"4"})
        assert len(cache) == 3
        return await cache.get_many(["a", "b", "c", "d"])

    assert asyncio.run(scenario()) == [b"1", None, b"3", b"4"]


def test_memory_cache_keeps_the_newest_max_items_when_many_are_set() -> None:
    async def scenario() -> tuple[int, list[bytes | None]]:
        cache = MemoryCache(max_items=10)
        for i in range(100):
            await cache.set_many({f"k{i}": str(i).encode()})
        return len(cache), await cache.get_many([f"k{i}" for i in range(88, 100)])

    size, found = asyncio.run(scenario())
    assert size == 10
    assert found == [None, None] + [str(i).encode() for i in range(90, 100)]


def test_memory_cache_returns_values_in_key_order_when_hits_and_misses_mix() -> None:
    async def scenario() -> list[bytes | None]:
        cache = MemoryCache(max_items=10)
        await cache.set_many({"x": b"X", "z": b"Z"})
        return await cache.get_many(["z", "missing", "x", "z", "other"])

    assert asyncio.run(scenario()) == [b"Z", None, b"X", b"Z", None]


def test_memory_cache_stores_nothing_when_max_items_is_zero() -> None:
    async def scenario() -> list[bytes | None]:
        cache = MemoryCache(max_items=0)
        await cache.set_many({"x": b"X"})
        return await cache.get_many(["x"])

    assert asyncio.run(scenario()) == [None]
    with pytest.raises(ValueError, match="max_items"):
        MemoryCache(max_items=-1)


def test_create_cache_picks_the_backend_when_given_a_url_or_none() -> None:
    assert isinstance(create_cache(None, 100), MemoryCache)
    disabled = create_cache("redis://127.0.0.1:1/0", 0)
    assert isinstance(disabled, MemoryCache) and disabled.max_items == 0

    async def scenario() -> None:
        cache = create_cache("redis://127.0.0.1:1/0", 100, ttl_s=5)
        assert isinstance(cache, RedisCache) and cache.ttl_ms == 5000
        await cache.close()

    asyncio.run(scenario())


@pytest.mark.integration
def test_redis_cache_round_trips_bytes_in_key_order_when_redis_is_up(redis_url: str) -> None:
    async def scenario() -> list[bytes | None]:
        cache = RedisCache(redis_url)
        try:
            await cache.set_many({"rt-a": b"\x00\x01binary", "rt-b": b"B"})
            return await cache.get_many(["rt-b", "rt-missing", "rt-a"])
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == [b"B", None, b"\x00\x01binary"]
    with redis.Redis.from_url(redis_url) as client:
        assert client.exists("sluice:cache:rt-a") == 1
        assert 86000 < client.ttl("sluice:cache:rt-a") <= 86400


@pytest.mark.integration
def test_redis_cache_misses_when_ttl_has_passed(redis_url: str) -> None:
    async def scenario() -> tuple[list[bytes | None], list[bytes | None]]:
        cache = RedisCache(redis_url, ttl_s=0.2)
        try:
            await cache.set_many({"ttl-a": b"A"})
            fresh = await cache.get_many(["ttl-a"])
            await asyncio.sleep(0.35)
            return fresh, await cache.get_many(["ttl-a"])
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == ([b"A"], [None])


def test_redis_cache_misses_and_counts_errors_without_raising_when_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[list[bytes | None], int]:
        cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0")
        try:
            found = await cache.get_many(["a", "b"])
            await cache.set_many({"a": b"A"})
            await cache.get_many(["a"])
            return found, cache.errors
        finally:
            await cache.close()

    with caplog.at_level(logging.WARNING, logger="gateway.cache"):
        found, errors = asyncio.run(scenario())
    assert found == [None, None]
    assert errors == 3
    assert len(caplog.records) == 1  # once per burst, not per call


@pytest.mark.integration
def test_redis_cache_misses_when_redis_stops_between_requests() -> None:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server (.ci/run does)")

    async def scenario() -> tuple[list[bytes | None], list[bytes | None], int]:
        with running_redis() as url:
            cache = RedisCache(url)
            await cache.set_many({"a": b"A"})
            before = await cache.get_many(["a"])
        try:
            return before, await cache.get_many(["a"]), cache.errors
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == ([b"A"], [None], 1)
