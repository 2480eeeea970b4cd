"""Whether the gateway's Redis answers, and what requests get while it does not (``gateway.redis_failure``).

The rate limiter and the cache share one :class:`RedisLink`. The first Redis call that fails marks Redis down: one
warning in the log (not one per request), ``sluice_gateway_redis_up`` to 0. While it is down no request touches
Redis, since each would pay a failed connection (or, behind a dead network, a connect timeout): a background task
pings it every ``PROBE_INTERVAL_S`` instead, each ping bounded by ``PROBE_TIMEOUT_S``. When a ping answers, Redis
is up again (one info line, the gauge back to 1) and the next request uses it.

While down, ``open`` (the default, as Kong and Envoy do): rate limits fall back to each replica's own memory, so N
replicas admit up to N x rate_limit, and the cache is bypassed. ``closed``: requests get 503 with ``Retry-After``
(gateway/ratelimit.py's ``RateLimitStorageError``). Start-up pings once (bounded), so a gateway started while Redis
is down starts at once and follows the same choice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("sluice.gateway")

RedisFailure = Literal["open", "closed"]
# Pings while Redis is down: at most one a second, each given up quickly (a refused connection fails at once; a
# host that does not answer would otherwise hold the ping for the OS's connect timeout).
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 0.25
# What a request that meets a down Redis in closed mode is told to wait: about one probe.
RETRY_AFTER_S = 1


def _nothing(*_: object) -> None:
    pass


class RedisLink:
    """Redis's state as this gateway process last saw it; ``up`` until a call fails, then until a ping answers.

    ``on_state(up)`` is called at each transition, ``on_failure()`` for each failed call or ping (the metrics).
    """

    def __init__(
        self,
        redis_url: str,
        failure: RedisFailure,
        *,
        on_state: Callable[[bool], None] = _nothing,
        on_failure: Callable[[], None] = _nothing,
    ) -> None:
        self.failure = failure
        self.up = True
        self._on_state = on_state
        self._on_failure = on_failure
        self._down_since = 0.0
        self._reconnecting: asyncio.Task[None] | None = None
        self._client = Redis.from_url(
            redis_url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S, retry=None
        )

    async def start(self) -> None:
        """Ping once, so that a Redis down at start-up is known before the first request (bounded: never hangs)."""
        if not await self._ping():
            self.failed(ConnectionError("no answer to PING at start-up"))

    def failed(self, error: BaseException) -> None:
        """A Redis call failed: count it; on the first, mark Redis down, log it once and start pinging."""
        self._on_failure()
        if not self.up:
            return
        self.up = False
        self._down_since = time.monotonic()
        fallback = (
            "rate limits are per replica, in memory, and the cache is bypassed"
            if self.failure == "open"
            else "requests get 503 (gateway.redis_failure: closed)"
        )
        log.warning("Redis (gateway.redis_url) cannot be reached: %s until it answers again (%s: %s)", fallback,
                    type(error).__name__, error)
        self._on_state(False)
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            if await self._ping():
                break
            self._on_failure()
        self.up = True
        self._reconnecting = None
        log.warning(
            "Redis answers again after %.1f s: rate limits and the cache are shared again",
            time.monotonic() - self._down_since,
        )
        self._on_state(True)

    async def _ping(self) -> bool:
        try:
            # wait_for as well: name resolution is outside the socket timeouts.
            await asyncio.wait_for(self._client.ping(), 2 * PROBE_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        await self._client.aclose()
