"""gateway.ratelimit: budgets on limits.aio, in memory and in a real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import ratelimit
from gateway.errors import Unavailable
from gateway.ratelimit import Decision, RateLimiter, RateLimitStorageError, limit_for_rate, storage_uri
from tests.redis_server import REDIS_SERVER, free_port, running_redis

ROOT = Path(__file__).resolve().parent.parent




BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """None (in-memory storage) or the module's Redis URL."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> str:
    return f"service:{request.node.name}"


async def _acquire_n(limiter: RateLimiter, bucket: str, rate: float, n: int) -> list[Decision]:
    return [await limiter.acquire(bucket, rate) for _ in range(n)]


@pytest.mark.parametrize(
    ("rate", "amount", "window_s"),
    [(100, 100, 1), (20, 20, 1), (2.5, 5, 2), (0.5, 1, 2), (1 / 3, 1, 3), (0.3, 3, 10), (7.3, 22, 3), (0.01, 1, 100)],
)
def test_limit_for_rate_gives_whole_requests_per_short_window_when_rate_is_fractional(
    rate: float, amount: int, window_s: int
) -> None:
    item = limit_for_rate(rate)
    assert (item.amount, item.get_expiry()) == (amount, window_s)
    assert abs(amount / window_s - rate) / rate <= 0.02


@pytest.mark.parametrize("rate", [0, -1, math.nan, math.inf])
def test_limit_for_rate_raises_when_rate_is_not_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be a positive number"):
        limit_for_rate(rate)


def test_storage_uri_maps_redis_urls_when_given_and_memory_when_none() -> None:
    assert storage_uri(None) == "async+memory://"
    assert storage_uri("redis://h:6379/2") == "async+redis://h:6379/2"
    assert storage_uri("rediss://h:6380/0") == "async+rediss://h:6380/0"
    assert storage_uri("unix:///run/redis.sock") == "async+redis+unix:///run/redis.sock"
    with pytest.raises(ValueError, match="redis://"):
        storage_uri("http://h:6379")


def test_decision_headers_add_retry_after_of_at_least_one_second_when_denied() -> None:
    denied = Decision(allowed=False, limit=5, remaining=0, reset_after=0.2)
    assert denied.headers() == {
        "x-ratelimit-limit": "5",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1",
        "Retry-After": "1",
    }
    assert "Retry-After" not in Decision(allowed=True, limit=5, remaining=3, reset_after=0.5).headers()
    assert Decision(allowed=False, limit=5, remaining=0, reset_after=1.2).headers()["Retry-After"] == "2"


def test_acquire_allows_until_budget_is_spent_then_denies_when_over_budget(
    backend_url: str | None, bucket: str
) -> None:
    async def scenario() -> list[Decision]:
        limiter = RateLimiter.from_url(backend_url)
        try:
            return await _acquire_n(limiter, bucket, 3, 4)
        finally:
            await limiter.close()

    decisions = asyncio.run(scenario())
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    denied = decisions[-1]
    assert denied.limit == 3 and 0 < denied.reset_after <= 1.0
    assert denied.headers() == {
        "x-ratelimit-limit": "3",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1",
        "Retry-After": "1",
    }


def test_acquire_frees_exactly_the_budget_when_denied_requests_were_made_meanwhile(
    backend_url: str | None, bucket: str
) -> None:
    async def scenario() -> tuple[list[bool], list[bool], list[bool]]:
        limiter = RateLimiter.from_url(backend_url)
        try:
            start = time.monotonic()
            first = [d.allowed for d in await _acquire_n(limiter, bucket, 5, 5)]
            # Refused requests spread over the first window: were any recorded, they would still fill the
            # window when the five admissions have left it.
            denied = []
            for _ in range(10):
                await asyncio.sleep(0.05)
                denied.append((await limiter.acquire(bucket, 5)).allowed)
            await asyncio.sleep(max(0.0, start + 1.1 - time.monotonic()))
            again = [d.allowed for d in await _acquire_n(limiter, bucket, 5, 6)]
            return first, denied, again
        finally:
            await limiter.close()

    first, denied, again = asyncio.run(scenario())
    assert first == [True] * 5
    assert denied == [False] * 10
    assert again == [True] * 5 + [False]


def test_acquire_admits_exactly_the_budget_when_requests_arrive_concurrently(
    backend_url: str | None, bucket: str
) -> None:
    async def scenario() -> list[Decision]:
        limiter = RateLimiter.from_url(backend_url)
        try:
            return list(await asyncio.gather(*(limiter.acquire(bucket, 10) for _ in range(50))))
        finally:
            await limiter.close()

    assert sum(d.allowed for d in asyncio.run(scenario())) == 10


def test_memory_storage_sweeps_at_most_once_per_interval_when_requests_are_frequent(bucket: str) -> None:
    # limits' own memory storage starts a sweep (a worker-thread hop) after nearly every hit; this fails if a
    # limits release renames the private scheduler that SweptMemoryStorage overrides.
    async def scenario() -> set[int]:
        limiter = RateLimiter.from_url(None)
        try:
            sweeps = set()
            for _ in range(300):
                await limiter.acquire(bucket, 1000)
                await asyncio.sleep(0)  # let a started sweep finish, as it would between requests
                sweeps.add(id(limiter._storage.timer))
            return sweeps
        finally:
            await limiter.close()

    assert len(asyncio.run(scenario())) == 1


def test_memory_storage_still_drops_admissions_that_left_their_window(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "SWEEP_INTERVAL_S", 0.1)

    async def scenario() -> tuple[int, int]:
        limiter = RateLimiter.from_url(None)
        try:
            await _acquire_n(limiter, bucket, 50, 40)
            storage = limiter._storage
            assert isinstance(storage, ratelimit.SweptMemoryStorage)
            before = sum(len(events) for events in storage.events.values())
            await asyncio.sleep(1.2)  # past the 1 s window and the sweep interval
            await limiter.acquire(bucket, 50)  # the hit that starts the next sweep
            await asyncio.sleep(0.1)
            return before, sum(len(events) for events in storage.events.values())
        finally:
            await limiter.close()

    before, after = asyncio.run(scenario())
    assert (before, after) == (40, 1)


async def _offer_load(limiter: RateLimiter, bucket: str, rate: float, offered_rate: float, duration_s: float) -> int:
    """Attempts at ``offered_rate`` for ``duration_s`` on a fixed schedule; returns how many were admitted."""
    admitted, start = 0, time.monotonic()
    for attempt in range(int(offered_rate * duration_s)):
        await asyncio.sleep(max(0.0, start + attempt / offered_rate - time.monotonic()))
        admitted += (await limiter.acquire(bucket, rate)).allowed
    return admitted


def test_acquire_admits_configured_rate_within_10_percent_when_offered_3x_in_memory(bucket: str) -> None:
    rate, duration_s = 20.0, 5.0

    async def scenario() -> int:
        limiter = RateLimiter.from_url(None)
        try:
            return await _offer_load(limiter, bucket, rate, 3 * rate, duration_s)
        finally:
            await limiter.close()

    admitted_rate = asyncio.run(scenario()) / duration_s
    print(f"memory: admitted {admitted_rate:.2f}/s of {rate}/s at 3x load")
    assert abs(admitted_rate - rate) <= 0.1 * rate


@pytest.mark.integration
def test_acquire_admits_configured_rate_within_10_percent_when_two_limiters_offer_3x_through_redis(
    redis_url: str, bucket: str
) -> None:
    rate, duration_s = 20.0, 5.0

    async def scenario() -> list[int]:
        limiters = [RateLimiter.from_url(redis_url), RateLimiter.from_url(redis_url)]
        try:  # two gateways, each offering 1.5x: one shared budget must hold the total to 1x
            return list(
                await asyncio.gather(*(_offer_load(lim, bucket, rate, 1.5 * rate, duration_s) for lim in limiters))
            )
        finally:
            await asyncio.gather(*(lim.close() for lim in limiters))

    per_limiter = asyncio.run(scenario())
    admitted_rate = sum(per_limiter) / duration_s
    print(f"redis: admitted {admitted_rate:.2f}/s of {rate}/s at 3x load (per limiter {per_limiter})")
    assert abs(admitted_rate - rate) <= 0.1 * rate


def test_acquire_counts_a_fractional_rate_over_a_longer_window_when_rate_is_2_5(
    backend_url: str | None, bucket: str
) -> None:
    async def scenario() -> list[Decision]:
        limiter = RateLimiter.from_url(backend_url)
        try:
            return await _acquire_n(limiter, bucket, 2.5, 6)
        finally:
            await limiter.close()

    decisions = asyncio.run(scenario())
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[-1].limit == 5 and decisions[-1].window_s == 2
    assert 1.0 < decisions[-1].reset_after <= 2.0
    assert decisions[-1].headers()["Retry-After"] == "2"


def test_acquire_keeps_buckets_independent_when_one_is_spent(backend_url: str | None, bucket: str) -> None:
    async def scenario() -> tuple[bool, bool]:
        limiter = RateLimiter.from_url(backend_url)
        try:
            await _acquire_n(limiter, bucket, 2, 2)
            spent = (await limiter.acquire(bucket, 2)).allowed
            other = (await limiter.acquire(f"{bucket}:other", 2)).allowed
            return spent, other
        finally:
            await limiter.close()

    assert asyncio.run(scenario()) == (False, True)


@pytest.mark.integration
def test_acquire_shares_one_budget_when_two_limiters_use_one_redis(redis_url: str, bucket: str) -> None:
    async def scenario() -> list[bool]:
        first, second = RateLimiter.from_url(redis_url), RateLimiter.from_url(redis_url)
        try:
            return [(await (first if i % 2 else second).acquire(bucket, 4)).allowed for i in range(10)]
        finally:
            await first.close()
            await second.close()

    assert asyncio.run(scenario()) == [True] * 4 + [False] * 6


_CHILD = """
import asyncio, sys
from gateway.ratelimit import RateLimiter

async def main() -> None:
    limiter = RateLimiter.from_url(sys.argv[1])
    print(sum([(await limiter.acquire(sys.argv[2], 0.3)).allowed for _ in range(5)]))
    await limiter.close()

asyncio.run(main())
"""


@pytest.mark.integration
def test_acquire_shares_one_budget_when_two_processes_use_one_redis(redis_url: str, bucket: str) -> None:
    # 0.3/s is 3 requests per 10 s: both processes run well inside one window, whatever their start-up times.
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, redis_url, bucket], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    admitted = [int(child.communicate(timeout=30)[0]) for child in children]
    assert sum(admitted) == 3


def test_acquire_raises_storage_error_when_redis_is_down(bucket: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/0")
        try:
            await limiter.acquire(bucket, 10)
        finally:
            await limiter.close()

    with pytest.raises(RateLimitStorageError) as caught:
        asyncio.run(scenario())
    assert isinstance(caught.value, Unavailable) and caught.value.status == 503


@pytest.mark.integration
def test_acquire_raises_storage_error_when_redis_stops_between_requests(bucket: str) -> None:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server (.ci/run does)")

    async def scenario() -> None:
        with running_redis() as url:
            limiter = RateLimiter.from_url(url)
            assert (await limiter.acquire(bucket, 10)).allowed
        try:  # the server is gone; the pooled connection is dead and a new one is refused
            with pytest.raises(RateLimitStorageError):
                await limiter.acquire(bucket, 10)
        finally:
            await limiter.close()

    asyncio.run(scenario())
