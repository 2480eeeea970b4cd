"""Requests-per-second budgets per service (and per API key): limits' sliding window counter, in memory or Redis.

Three separate choices, as in ``limits`` itself:

- *what*: :func:`limit_for_rate` turns a configured rate (requests/second, a float) into a
  ``limits`` item: a whole number of units per whole number of seconds;
- *where*: :meth:`RateLimiter.from_url` keeps the counters in this process (limits' memory storage) when the
  gateway has no Redis URL, else in that Redis, so that every gateway process draws on one shared budget;
- *how*: the sliding window counter (:class:`limits.aio.strategies.SlidingWindowCounterRateLimiter`). Each bucket
  keeps two counters, the current window's and the previous window's, and admits ``amount`` units while
  ``floor(previous * (time left in the current window) / window) + current + amount <= limit``.

Why this strategy: its cost per request does not depend on the limit. The moving window it replaces kept one entry
per admission (a Redis list of up to ``limit`` timestamps per bucket, 1.8 MB for one bucket after 100,000 admissions
at 1,000,000/s), and its per-request work grew with that list, in memory as in Redis. The counter is two integers
per bucket whatever the rate (tests/test_ratelimit.py checks the Redis keys' size at 1,000,000/s).

What it approximates: the previous window's admissions are assumed to have been spread evenly over it. Under steady
load the admitted rate converges on the configured one (tests/test_ratelimit.py measures it at 3x load). A whole
budget spent at the very end of one window, then steady demand through the next, lets nearly 2x ``limit`` through
in one window's time; no aligned window ever holds more than ``limit``, so two hold at most 2x ``limit``.
Memory windows are aligned on the epoch; Redis windows start with a bucket's first admission after it idled.

A refused acquire records nothing (limits' memory storage refuses before its increment, the Redis script before
its INCRBY), so clients hammering a spent budget do not push their own recovery further out.

One Redis round trip per acquire: limits' Redis script answers only allowed/refused, and the ``x-ratelimit-*``
headers need the counters, which limits reads with a second script: a second round trip for every request, about
twice the gateway's CPU per acquire (measure with benchmarks/ratelimit_cost.py). So
:data:`ACQUIRE_SLIDING_WINDOW_LUA` is limits' ``acquire_sliding_window.lua`` returning the counters as well, on
limits' own keys: limits' ``get_sliding_window`` and ``SlidingWindowCounterRateLimiter`` read and spend the same
budget (a test ties them). In memory limits' storage is used as it is: its acquire and its read cost no round trip
and no other task runs between them.

While Redis cannot be reached, :class:`RateLimiter` given a :class:`gateway.redis_link.RedisLink` does what
``gateway.redis_failure`` says: ``open`` spends from this process's memory (each replica its own budget) without
touching Redis until the link's ping answers; ``closed`` raises :class:`RateLimitStorageError` (503, Retry-After).

Buckets are plain strings chosen by the gateway (``service:<name>``, ``key:<hash>:<service>``); in Redis they
live under ``sluice:{ratelimit/<bucket>/<amount>/<window>/second}`` (current window) and ``.../-1`` (previous).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.errors import Unavailable
from gateway.redis_link import RETRY_AFTER_S, RedisLink

MEMORY_URI = "async+memory://"
REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_KEY_PREFIX = "sluice"
NAMESPACE = "ratelimit"

# Window search for non-integer rates: the shortest window (whole seconds, as limits counts them) whose whole
# number of requests lies within ROUNDING_TOLERANCE of rate * window. Short windows keep the largest burst
# (a full window's budget at once) small; the tolerance stays well inside the 10% the gateway promises.
LONGEST_WINDOW_S = 60
ROUNDING_TOLERANCE = 0.02

# A rate limiter that waits on a dead Redis adds its wait to every request: fail within a second instead, and
# much sooner for a connection (on loopback or a LAN one takes well under a millisecond).
REDIS_TIMEOUT_S = 1.0
REDIS_CONNECT_TIMEOUT_S = 0.25

# How often the in-memory storage drops counters whose windows have passed (see SweptMemoryStorage).
SWEEP_INTERVAL_S = 1.0

# limits 5.8's resources/redis/lua_scripts/acquire_sliding_window.lua (same keys, shift and test), returning
# {allowed, previous count, previous TTL ms, current count, current TTL ms} instead of true/false.
# KEYS: previous window, current window; ARGV: limit, window in seconds, amount.
ACQUIRE_SLIDING_WINDOW_LUA = """
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2]) * 1000
local amount = tonumber(ARGV[3])

local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
    -- the current window has ended: it becomes the previous one
    redis.call('rename', KEYS[2], KEYS[1])
    redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end

local previous_count = tonumber(redis.call('get', KEYS[1])) or 0
local previous_ttl = math.max(0, tonumber(redis.call('pttl', KEYS[1])))
local current_count = tonumber(redis.call('get', KEYS[2])) or 0
current_ttl = math.max(0, tonumber(redis.call('pttl', KEYS[2])))

if amount > limit or math.floor(previous_count * previous_ttl / expiry) + current_count + amount > limit then
    return {0, previous_count, previous_ttl, current_count, current_ttl}
end
if redis.call('exists', KEYS[2]) == 1 then
    current_count = redis.call('incrby', KEYS[2], amount)
else
    redis.call('set', KEYS[2], amount, 'PX', expiry * 2)
    current_count = amount
    current_ttl = expiry * 2
end
return {1, previous_count, previous_ttl, current_count, current_ttl}
"""


class RateLimitStorageError(Unavailable):
    """The rate-limit storage (Redis) could not be reached: the request is neither allowed nor denied (503)."""

    def __init__(self, cause: Exception | None) -> None:
        super().__init__(
            "Rate limiting is unavailable: Redis, which holds the rate limits, cannot be reached. Retry later.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
        self.storage_error = cause


@dataclass(frozen=True)
class Decision:
    """The outcome of one :meth:`RateLimiter.acquire`, and what to tell the client about its budget."""

    allowed: bool
    limit: int  # units per window
    remaining: int  # units left now
    reset_after: float  # refused: seconds until the refused amount fits; allowed: until one more unit frees
    window_s: int = 1  # the window ``limit`` counts over

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` headers, plus ``Retry-After`` (whole seconds, at least 1) when refused."""
        headers = {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(math.ceil(self.reset_after)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.reset_after)))
        return headers


class SlidingWindow(NamedTuple):
    """A bucket's two counters as limits' ``get_sliding_window`` returns them (TTLs in seconds)."""

    previous_count: int
    previous_ttl: float  # time left in the current window (the previous count's weight, times the window)
    current_count: int
    current_ttl: float  # time left in the current window plus one window


def seconds_until_free(window: SlidingWindow, limit: int, expiry: int, units: int) -> float:
    """Seconds until ``units`` would be admitted, if nothing else is admitted meanwhile.

    The previous count's weight falls linearly to 0 by the end of the current window; then the current count
    becomes the previous one and falls over the next window. More units than ``limit`` never fit: the answer is
    then the time until the whole budget is back.
    """
    previous, previous_ttl, current, current_ttl = window
    to_window_end = max(0.0, current_ttl - expiry)
    if units > limit:
        return to_window_end + expiry if current else previous_ttl
    room = limit - current - units  # what floor(previous * weight) must fall to
    if room >= 0:
        if math.floor(previous * previous_ttl / expiry) <= room:
            return 0.0
        return max(0.0, previous_ttl - (room + 1) * expiry / previous)
    # The current window alone holds too much: wait for it to end, then for its count, weighted, to fall.
    return to_window_end + max(0.0, expiry - (limit - units + 1) * expiry / current)


def decide(allowed: bool, window: SlidingWindow, item: RateLimitItem, amount: int) -> Decision:
    """The :class:`Decision` for an acquire of ``amount`` units that left ``window`` behind it."""
    expiry = item.get_expiry()
    spent = math.floor(window.previous_count * window.previous_ttl / expiry) + window.current_count
    remaining = max(0, item.amount - spent)
    # Refused: when the refused amount fits. Allowed: when the next unit frees (0 while the budget is whole).
    units = min(remaining + 1, item.amount) if allowed else amount
    return Decision(
        allowed=allowed,
        limit=item.amount,
        remaining=remaining,
        reset_after=seconds_until_free(window, item.amount, expiry, units),
        window_s=expiry,
    )


@functools.lru_cache(maxsize=256)
def limit_for_rate(rate: float) -> RateLimitItem:
    """``rate`` requests/second as ``amount`` requests per ``window`` whole seconds.

    The rule: the shortest window of 1..60 s for which ``round(rate * window)`` (at least 1) is within 2% of
    ``rate * window``; failing that, the window in that range with the smallest error; below one request a
    minute, one request per ``round(1 / rate)`` seconds. So 100/s -> 100 per 1 s, 2.5/s -> 5 per 2 s,
    0.5/s -> 1 per 2 s, 7.3/s -> 22 per 3 s, 0.3/s -> 3 per 10 s.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
    if rate * LONGEST_WINDOW_S < 1:
        return RateLimitItemPerSecond(1, round(1 / rate), namespace=NAMESPACE)
    best: tuple[float, int, int] | None = None  # (relative error, amount, window)
    for window in range(1, LONGEST_WINDOW_S + 1):
        exact = rate * window
        amount = max(1, round(exact))
        error = abs(amount - exact) / exact
        if error <= ROUNDING_TOLERANCE:
            return RateLimitItemPerSecond(amount, window, namespace=NAMESPACE)
        if best is None or error < best[0]:
            best = (error, amount, window)
    assert best is not None
    return RateLimitItemPerSecond(best[1], best[2], namespace=NAMESPACE)


@functools.lru_cache(maxsize=1024)
def _bucket_key(rate: float, bucket: str) -> tuple[RateLimitItem, str]:
    item = limit_for_rate(rate)
    return item, item.key_for(bucket)


def redis_window_keys(key: str) -> tuple[str, str]:
    """The Redis keys of ``key``'s previous and current windows: limits' RedisStorage layout (a hash tag keeps
    both on one cluster node)."""
    current = f"{REDIS_KEY_PREFIX}:{{{key}}}"
    return f"{current}/-1", current


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process storage, sweeping expired counters once a second instead of after every admission.

    ``limits.aio``'s MemoryStorage starts a sweep task on every increment whose previous sweep has ended, and each
    sweep walks every counter of every bucket: a task per admitted request whose cost grows with the number of
    buckets (70 us per acquire with 1,000 other buckets, against 7 us swept once a second). The sweep only bounds
    memory (each window's counter is read through ``get``, which drops it once expired), so running it at most
    every ``SWEEP_INTERVAL_S`` changes no decision. The override hooks limits' private, name-mangled scheduler;
    tests/test_ratelimit.py fails if a limits release renames it.
    """

    def __init__(self, uri: str | None = None, **options: Any) -> None:
        super().__init__(uri, **options)
        self._next_sweep = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]  # private in limits


class WindowStore(Protocol):
    """Where a limiter keeps its counters: an atomic acquire that also returns the counters it left."""

    async def acquire(self, key: str, limit: int, expiry: int, amount: int) -> tuple[bool, SlidingWindow]: ...

    async def close(self) -> None: ...


class MemoryWindows:
    """Counters in this process: limits' memory storage, its acquire then its read (nothing runs between)."""

    def __init__(self) -> None:
        self.storage = SweptMemoryStorage(MEMORY_URI)

    async def acquire(self, key: str, limit: int, expiry: int, amount: int) -> tuple[bool, SlidingWindow]:
        allowed = await self.storage.acquire_sliding_window_entry(key, limit, expiry, amount)
        return allowed, SlidingWindow(*await self.storage.get_sliding_window(key, expiry))

    async def close(self) -> None:
        timer = self.storage.timer
        if isinstance(timer, asyncio.Task) and not timer.done():
            timer.cancel()


class RedisWindows:
    """Counters in Redis, shared by every gateway process: one script call (one round trip) per acquire."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._script = Redis(connection_pool=pool).register_script(ACQUIRE_SLIDING_WINDOW_LUA)

    async def acquire(self, key: str, limit: int, expiry: int, amount: int) -> tuple[bool, SlidingWindow]:
        allowed, previous, previous_ttl_ms, current, current_ttl_ms = await self._script(
            redis_window_keys(key), [limit, expiry, amount]
        )
        return bool(allowed), SlidingWindow(previous, previous_ttl_ms / 1000, current, current_ttl_ms / 1000)

    async def close(self) -> None:
        await self._pool.aclose()


class RateLimiter:
    """Sliding-window-counter budgets over one store; one instance per gateway process, shared by all routes.

    With a ``link`` (Redis's state, shared with the cache) a store failure marks Redis down, and while it is down
    the link's ``failure`` choice applies; without one every acquire tries the store and a failure raises.
    """

    def __init__(self, store: WindowStore, link: RedisLink | None = None) -> None:
        self._store = store
        self._link = link
        self._fallback: MemoryWindows | None = None  # open mode's budgets while Redis is down

    @classmethod
    def from_url(cls, redis_url: str | None, link: RedisLink | None = None) -> RateLimiter:
        """In-memory budgets when ``redis_url`` is None, else budgets shared through that Redis
        (``redis://``, ``rediss://`` or ``unix://``), falling back as ``link`` says while it is down."""
        if redis_url is None:
            return cls(MemoryWindows())
        if redis_url.partition("://")[0] not in REDIS_SCHEMES:
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL for rate limits, got {redis_url!r}")
        # Fail fast, with one immediate retry on a connection error: it covers a connection that Redis dropped
        # while idle. No retry on timeouts, where the script may have run and a second run would spend twice.
        pool = ConnectionPool.from_url(
            redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return cls(RedisWindows(pool), link)

    async def acquire(self, bucket: str, rate: float, amount: int = 1) -> Decision:
        """Spend ``amount`` units from ``bucket``'s budget of ``rate`` units/second, if that many are left.

        All or nothing: a refused acquire spends nothing. More units than the budget's ``limit`` (see
        :func:`limit_for_rate`) are never admitted; callers that can send such requests should refuse them
        up front. Raises :class:`RateLimitStorageError` when the storage cannot be reached and there is no
        fallback (no link, or a link whose ``failure`` is ``closed``): neither allow nor deny.
        """
        if amount < 1:
            raise ValueError(f"amount must be at least 1, got {amount!r}")
        item, key = _bucket_key(rate, bucket)
        link, cause = self._link, None
        if link is None or link.up:
            try:
                allowed, window = await self._store.acquire(key, item.amount, item.get_expiry(), amount)
                return decide(allowed, window, item, amount)
            except RedisError as exc:  # the memory store raises none
                if link is not None:
                    link.failed(exc)
                cause = exc
        if link is None or link.failure == "closed":
            raise RateLimitStorageError(cause) from cause
        if self._fallback is None:
            self._fallback = MemoryWindows()
        allowed, window = await self._fallback.acquire(key, item.amount, item.get_expiry(), amount)
        return decide(allowed, window, item, amount)

    async def close(self) -> None:
        """Release the Redis connections, or stop the memory storage's expiry task."""
        await self._store.close()
        if self._fallback is not None:
            await self._fallback.close()
