"""A per-item cache for embeddings and rerank scores: one entry per input text, opaque bytes per entry.

The gateway encodes arrays itself; this module only keys, stores and fetches bytes. A cache is an
optimisation, so a failing Redis turns into misses (reads) and dropped writes, counted in ``errors`` and
logged once per burst of failures, never into a failed request. Given the gateway's
:class:`gateway.redis_link.RedisLink`, a failure marks Redis down (the link logs it, once) and the cache is
bypassed, without a Redis call, until the link's ping answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .redis_link import RedisLink

logger = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "sluice:cache:"
DEFAULT_TTL_S = 86400
# Bump when the key recipe or the stored encoding changes, so old entries are never read back as new ones.
KEY_VERSION = 2
# A cache lookup is only worth it if it is faster than recomputing: give up on Redis quickly.
REDIS_TIMEOUT_S = 0.5
# During a long outage, remind the log this often instead of on every failing call.
ERROR_LOG_INTERVAL_S = 60.0


def key_namespace(service: str, fingerprint: str, params: Mapping[str, object]) -> bytes:
    """A canonical JSON of everything but the item that changes an item's output: computed once per request.

    ``fingerprint`` names the model build (weights, tokenizer, export); ``params`` the request options that
    change the result (``normalize``, ``dimensions``, a rerank query, ...). Keys are sorted and the JSON is
    compact, so it is the same in every process and run; note ``1`` and ``1.0`` are different params.
    Raises ``TypeError`` for params that JSON cannot represent.
    """
    canonical = json.dumps(
        {"v": KEY_VERSION, "service": service, "fingerprint": fingerprint, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return canonical.encode("utf-8")


def item_keys(namespace: bytes, items: Sequence[str]) -> list[str]:
    """SHA-256 hex of the namespace followed by each item (a JSON object delimits itself: no ambiguity)."""
    keys = []
    for item in items:
        digest = hashlib.sha256(namespace)
        digest.update(item.encode("utf-8"))
        keys.append(digest.hexdigest())
    return keys


class ItemCache(Protocol):
    """What the gateway needs from a cache: batched reads in key order, batched writes, and shutdown."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Mapping[str, bytes]) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """A bounded LRU in this process: ``max_items`` entries at most, 0 disables it.

    O(1) per item (an ``OrderedDict``). Methods never await while touching the dict, so concurrent requests
    on one event loop cannot interleave inside an update: no lock needed.
    """

    def __init__(self, max_items: int) -> None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        self.max_items = max_items
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for key in keys:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)  # most recently used
            found.append(value)
        return found

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        if self.max_items == 0:
            return
        for key, value in items.items():
            self._entries[key] = value
            self._entries.move_to_end(key)
            if len(self._entries) > self.max_items:
                self._entries.popitem(last=False)  # least recently used

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    """Entries in Redis under ``sluice:cache:<key>``, each expiring ``ttl_s`` seconds after it was written.

    Reads are one ``MGET``; writes one pipeline of ``SET ... PX`` (not a transaction: entries are independent).
    Bounding memory is left to Redis (``maxmemory`` with an LRU policy). With a ``link``, reads miss and writes
    are dropped while it says Redis is down.
    """

    def __init__(self, redis_url: str, ttl_s: float = DEFAULT_TTL_S, link: RedisLink | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.errors = 0  # Redis failures so far, each one a batch served as misses or a write dropped
        self._failing_since: float | None = None  # start of the current burst of failures
        self._last_logged = 0.0
        self._link = link
        # No retries but one, on a connection error: it covers a pooled connection that Redis dropped (idle, or
        # restarted), at the cost of one connect. Others cost more than the recomputation they might save.
        self._redis = Redis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self._link is not None and not self._link.up:
            return [None] * len(keys)
        try:
            values = await self._redis.mget([REDIS_KEY_PREFIX + key for key in keys])
        except RedisError as exc:
            self._failed("read", exc)
            return [None] * len(keys)
        self._succeeded()
        return cast("list[bytes | None]", values)  # bytes, not str: the client does not decode responses

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        if not items or (self._link is not None and not self._link.up):
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(REDIS_KEY_PREFIX + key, value, px=self.ttl_ms)
                await pipe.execute()
        except RedisError as exc:
            self._failed("write", exc)
            return
        self._succeeded()

    async def close(self) -> None:
        await self._redis.aclose()

    def _failed(self, operation: str, exc: RedisError) -> None:
        self.errors += 1
        if self._link is not None:  # the link logs and counts the outage, once for the cache and the limiter
            self._link.failed(exc)
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._last_logged = now
            logger.warning("item cache: Redis %s failed, serving misses until it recovers: %r", operation, exc)
        elif now - self._last_logged >= ERROR_LOG_INTERVAL_S:
            self._last_logged = now
            logger.warning(
                "item cache: Redis still failing after %.0f s (%d errors so far): %r",
                now - self._failing_since, self.errors, exc,
            )  # fmt: skip

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            logger.info("item cache: Redis recovered after %.0f s", time.monotonic() - self._failing_since)
            self._failing_since = None


def create_cache(
    redis_url: str | None, max_items: int, ttl_s: float = DEFAULT_TTL_S, link: RedisLink | None = None
) -> ItemCache:
    """The gateway's cache: in this process (an LRU of ``max_items``) or, given a URL, in Redis.

    ``max_items == 0`` turns caching off for either backend; with Redis it is otherwise unused, since Redis
    bounds its own memory.
    """
    if redis_url is None or max_items == 0:
        return MemoryCache(max_items)
    return RedisCache(redis_url, ttl_s, link)
