"""Requests-per-second budgets per service (and per API key), on :mod:`limits.aio`.

Three separate choices, as in ``limits`` itself:

- *what*: :func:`limit_for_rate` turns a configured rate (requests/second, a float) into a
  ``limits`` item: a whole number of requests per whole number of seconds;
- *where*: :func:`storage_uri` picks the storage from the gateway's Redis URL: ``async+memory://`` for one
  process, ``async+redis://...`` so that every gateway process draws on one shared budget;
- *how*: the moving-window strategy (what :class:`limits.aio.strategies.MovingWindowRateLimiter` does, called on
  the storage directly), because

  * it keeps the timestamp of every admitted request in the window, so no window of ``window_s`` seconds ever
    holds more than ``limit`` admissions: no double burst at a window edge as with a fixed window, and no
    estimate as with the sliding-window counter. Under sustained overload a slot is reused as soon as it frees,
    so the admitted rate converges on the configured one (tests/test_ratelimit.py measures it at 3x load);
  * a refused ``hit`` records nothing (the Redis script returns before its LPUSH; the memory storage before
    its insert), so clients hammering a spent budget do not push their own recovery further out.

Buckets are plain strings chosen by the gateway (``service:<name>``, ``key:<hash>:<service>``); in Redis they
live under ``sluice:ratelimit/<bucket>/<amount>/<window>/second``, with an expiry of one window.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import limits.errors
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, MovingWindowSupport, RedisStorage, Storage
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.errors import Unavailable

MEMORY_URI = "async+memory://"
REDIS_KEY_PREFIX = "sluice"
NAMESPACE = "ratelimit"

# Window search for non-integer rates: the shortest window (whole seconds, as limits counts them) whose whole
# number of requests lies within ROUNDING_TOLERANCE of rate * window. Short windows keep the largest burst
# (a full window's budget at once) small; the tolerance stays well inside the 10% the gateway promises.
LONGEST_WINDOW_S = 60
ROUNDING_TOLERANCE = 0.02

# A rate limiter that waits on a dead Redis adds its wait to every request: fail within a second instead.
REDIS_TIMEOUT_S = 1.0

# How often the in-memory storage drops admissions that have left their window (see SweptMemoryStorage).
SWEEP_INTERVAL_S = 1.0


class RateLimitStorageError(Unavailable):
    """The rate-limit storage (Redis) could not be reached: the request is neither allowed nor denied (503)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__("Rate limiting is unavailable: its storage cannot be reached. Try again later.")
        self.storage_error = cause


@dataclass(frozen=True)
class Decision:
    """The outcome of one :meth:`RateLimiter.acquire`, and what to tell the client about its budget."""

    allowed: bool
    limit: int  # requests per window
    remaining: int  # requests left in the current window
    reset_after: float  # seconds until the oldest admission leaves the window and frees one request
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


def storage_uri(redis_url: str | None) -> str:
    """The ``limits`` storage URI for the gateway's Redis URL (``redis://``, ``rediss://``, ``unix://``)."""
    if redis_url is None:
        return MEMORY_URI
    scheme, sep, rest = redis_url.partition("://")
    mapped = {"redis": "async+redis", "rediss": "async+rediss", "unix": "async+redis+unix"}.get(scheme)
    if not sep or mapped is None:
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL for rate limits, got {redis_url!r}")
    return f"{mapped}://{rest}"


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process storage, sweeping expired admissions once a second instead of after every hit.

    ``limits.aio``'s MemoryStorage starts a sweep task on every hit whose previous sweep has ended, and each sweep
    hands every bucket's list to a worker thread (``asyncio.to_thread``): a thread hop per request, which a py-spy
    profile of the gateway put at a fifth of its CPU. The sweep only bounds memory (a hit decides from the newest
    ``limit`` entries, whatever lies beyond them), so running it at most every ``SWEEP_INTERVAL_S`` changes no
    decision. The override hooks limits' private, name-mangled scheduler; tests/test_ratelimit.py fails if a
    limits release renames it.
    """

    def __init__(self, uri: str | None = None, **options: Any) -> None:
        super().__init__(uri, **options)
        self._next_sweep = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]  # private in limits


class RateLimiter:
    """Moving-window budgets over one storage; one instance per gateway process, shared by all routes."""

    def __init__(self, storage: Storage, *, pool: ConnectionPool | None = None) -> None:
        if not isinstance(storage, MovingWindowSupport):
            raise TypeError(f"{type(storage).__name__} does not support moving windows")
        self._storage: MovingWindowSupport = storage
        self._pool = pool  # the Redis connections we opened, closed by close()

    @classmethod
    def from_url(cls, redis_url: str | None) -> RateLimiter:
        """In-memory budgets when ``redis_url`` is None, else budgets shared through that Redis."""
        uri = storage_uri(redis_url)
        if redis_url is None:
            return cls(SweptMemoryStorage(uri))
        # Our own pool: limits' client would retry with backoff for seconds, and gives us no way to close it.
        # One immediate retry on a connection error covers a connection that Redis dropped while idle; no
        # retry on timeouts, where the script may have run and a second run would spend the budget twice.
        pool = ConnectionPool.from_url(
            redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        options: dict[str, Any] = {"connection_pool": pool}
        storage = RedisStorage(
            uri, wrap_exceptions=True, implementation="redispy", key_prefix=REDIS_KEY_PREFIX, **options
        )
        return cls(storage, pool=pool)

    async def acquire(self, bucket: str, rate: float) -> Decision:
        """Spend one request from ``bucket``'s budget of ``rate`` requests/second, if one is left.

        Raises :class:`RateLimitStorageError` when the storage cannot be reached: neither allow nor deny.
        """
        item, key = _bucket_key(rate, bucket)
        expiry = item.get_expiry()
        # What MovingWindowRateLimiter.hit and .get_window_stats do, on the storage's moving-window interface
        # directly: the strategy's wrappers (and the key it rebuilds on each call) cost more than the storage.
        try:
            allowed = await self._storage.acquire_entry(key, item.amount, expiry)
            # A second round trip: under concurrent requests the figures may be a request or two stale, which
            # headers tolerate; the decision itself came from the atomic acquire above.
            window_start, admitted = await self._storage.get_moving_window(key, item.amount, expiry)
        except limits.errors.StorageError as exc:
            raise RateLimitStorageError(exc.storage_error) from exc
        return Decision(
            allowed=allowed,
            limit=item.amount,
            remaining=max(0, item.amount - admitted),
            reset_after=max(0.0, window_start + expiry - time.time()),
            window_s=expiry,
        )

    async def close(self) -> None:
        """Release the Redis connections, or stop the memory storage's expiry task."""
        if self._pool is not None:
            await self._pool.aclose()
        timer = getattr(self._storage, "timer", None)
        if isinstance(timer, asyncio.Task) and not timer.done():
            timer.cancel()
