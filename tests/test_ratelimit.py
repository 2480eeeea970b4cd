"""gateway.ratelimit: budgets on limits.aio, in memory and in a real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import ConnectionPool

from gateway import ratelimit
from gateway.errors import Unavailable
from gateway.ratelimit import (
    REDIS_KEY_PREFIX,
    Decision,
    RateLimiter,
    RateLimitStorageError,
    SlidingWindow,
    decide,
    limit_for_rate,
    seconds_until_free,
)
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


def _memory_storage(limiter: RateLimiter) -> ratelimit.SweptMemoryStorage:
    store = limiter._store
    assert isinstance(store, ratelimit.MemoryWindows)
    return store.storage


def _counters_of(storage: ratelimit.SweptMemoryStorage, bucket: str) -> list[str]:
    return [key for key in storage.storage if f"/{bucket}/" in key]


async def _room_in_window(window_s: int, room_s: float) -> None:
    """Wait for the next window if fewer than ``room_s`` seconds are left in this one.

    Memory windows are aligned on the epoch (Redis windows start with a fresh bucket's first admission): a test
    that needs its acquires inside one window, or a known time into it, starts here.
    """
    left = window_s - time.time() % window_s
    if left < room_s:
        await asyncio.sleep(left + 0.01)


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


def test_from_url_raises_when_url_is_not_redis() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RateLimiter.from_url("http://h:6379")


def test_seconds_until_free_waits_for_the_previous_window_to_fade_when_it_holds_the_budget() -> None:
    # 10 per 1 s, half-way through the window: the previous 10 weigh 5, the current window holds 5.
    window = SlidingWindow(previous_count=10, previous_ttl=0.5, current_count=5, current_ttl=1.5)
    assert seconds_until_free(window, limit=10, expiry=1, units=1) == pytest.approx(0.0)
    assert seconds_until_free(window, limit=10, expiry=1, units=3) == pytest.approx(0.2)  # 10 x (0.5 - t) < 3


def test_seconds_until_free_waits_past_the_window_end_when_the_current_window_holds_the_budget() -> None:
    # 5 per 2 s, 1 s into the window, all 5 spent in it: they weigh 5 x (2 - s) / 2 into the next window.
    window = SlidingWindow(previous_count=0, previous_ttl=0.0, current_count=5, current_ttl=3.0)
    assert seconds_until_free(window, limit=5, expiry=2, units=1) == pytest.approx(1.0)
    assert seconds_until_free(window, limit=5, expiry=2, units=3) == pytest.approx(1.8)
    assert seconds_until_free(window, limit=5, expiry=2, units=6) == pytest.approx(3.0)  # never fits: all back


def test_decide_reports_remaining_as_limit_minus_weighted_count_when_both_windows_hold_requests() -> None:
    item = limit_for_rate(10)
    allowed = decide(True, SlidingWindow(7, 0.5, 2, 1.5), item, 1)
    assert (allowed.remaining, allowed.limit, allowed.window_s) == (10 - 3 - 2, 10, 1)
    refused = decide(False, SlidingWindow(10, 0.5, 5, 1.5), item, 3)
    assert refused.remaining == 0 and refused.reset_after == pytest.approx(0.2)
    assert refused.headers()["Retry-After"] == "1"


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
        await _room_in_window(1, 0.5)
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


def test_acquire_spends_amount_units_and_refuses_them_whole_when_fewer_remain(
    backend_url: str | None, bucket: str
) -> None:
    async def scenario() -> list[Decision]:
        await _room_in_window(1, 0.5)
        limiter = RateLimiter.from_url(backend_url)
        try:
            return [await limiter.acquire(bucket, 5, amount) for amount in (3, 3, 6, 2, 1)]
        finally:
            await limiter.close()

    decisions = asyncio.run(scenario())
    # 3 of 5 spent; 3 more refused whole (and 6, more than the limit, always), spending nothing; 2 then fit.
    assert [(d.allowed, d.remaining) for d in decisions] == [(True, 2), (False, 2), (False, 2), (True, 0), (False, 0)]
    assert all("Retry-After" in d.headers() for d in decisions if not d.allowed)


def test_acquire_raises_when_amount_is_below_one(bucket: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter.from_url(None)
        try:
            await limiter.acquire(bucket, 5, 0)
        finally:
            await limiter.close()

    with pytest.raises(ValueError, match="amount must be at least 1"):
        asyncio.run(scenario())


def test_acquire_weights_the_previous_window_and_not_refused_requests_when_the_window_turns(
    backend_url: str | None, bucket: str
) -> None:
    async def scenario() -> tuple[list[bool], list[bool], list[bool]]:
        await _room_in_window(2, 1.9)  # 2.5/s is 5 per 2 s: start at a window's start
        limiter = RateLimiter.from_url(backend_url)
        try:
            start = time.monotonic()
            first = [d.allowed for d in await _acquire_n(limiter, bucket, 2.5, 5)]
            denied = []
            for _ in range(10):
                await asyncio.sleep(0.05)
                denied.append((await limiter.acquire(bucket, 2.5)).allowed)
            # Half-way through the next window the previous window's 5 weigh floor(2.5) = 2, leaving 3; had the 10
            # refusals counted, its 15 would weigh 7, over the limit.
            await asyncio.sleep(max(0.0, start + 3.0 - time.monotonic()))
            again = [d.allowed for d in await _acquire_n(limiter, bucket, 2.5, 6)]
            return first, denied, again
        finally:
            await limiter.close()

    first, denied, again = asyncio.run(scenario())
    assert first == [True] * 5
    assert denied == [False] * 10
    assert again == [True] * 3 + [False] * 3


def test_acquire_admits_exactly_the_budget_when_requests_arrive_concurrently(
    backend_url: str | None, bucket: str
) -> None:
    async def scenario() -> list[Decision]:
        await _room_in_window(1, 0.5)  # within one window the counter is exact
        limiter = RateLimiter.from_url(backend_url)
        try:
            return list(await asyncio.gather(*(limiter.acquire(bucket, 10) for _ in range(50))))
        finally:
            await limiter.close()

    assert sum(d.allowed for d in asyncio.run(scenario())) == 10


def test_memory_storage_sweeps_at_most_once_per_interval_when_requests_are_frequent(bucket: str) -> None:
    # limits' own memory storage starts a sweep (a walk over every counter) after nearly every admission; this
    # fails if a limits release renames the private scheduler that SweptMemoryStorage overrides.
    async def scenario() -> set[int]:
        limiter = RateLimiter.from_url(None)
        storage = _memory_storage(limiter)
        try:
            sweeps = set()
            for _ in range(300):
                await limiter.acquire(bucket, 1000)
                await asyncio.sleep(0)  # let a started sweep finish, as it would between requests
                sweeps.add(id(storage.timer))
            return sweeps
        finally:
            await limiter.close()

    assert len(asyncio.run(scenario())) == 1


def test_memory_storage_still_drops_counters_whose_windows_have_passed(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "SWEEP_INTERVAL_S", 0.1)

    async def scenario() -> tuple[list[str], list[str]]:
        await _room_in_window(1, 0.5)
        limiter = RateLimiter.from_url(None)
        storage = _memory_storage(limiter)
        try:
            await _acquire_n(limiter, bucket, 50, 40)
            before = _counters_of(storage, bucket)
            await asyncio.sleep(2.2)  # a counter lives two windows (limits' rule), then the sweep interval
            await limiter.acquire(bucket, 50)  # the admission that starts the next sweep
            await asyncio.sleep(0.1)
            return before, _counters_of(storage, bucket)
        finally:
            await limiter.close()

    before, after = asyncio.run(scenario())
    assert len(before) == 1 and len(after) == 1 and after != before


def test_memory_storage_keeps_a_counter_per_window_not_per_admission_when_the_rate_is_a_million(bucket: str) -> None:
    async def scenario() -> tuple[int, list[str], int]:
        limiter = RateLimiter.from_url(None)
        storage = _memory_storage(limiter)
        try:
            admitted = sum([(await limiter.acquire(bucket, 1_000_000)).allowed for _ in range(20_000)])
            return admitted, _counters_of(storage, bucket), len(storage.events)
        finally:
            await limiter.close()

    admitted, counters, moving_window_entries = asyncio.run(scenario())
    assert admitted == 20_000
    # One counter per window the run touched (the sweep drops them two windows on); none per admission.
    assert 1 <= len(counters) <= 3 and moving_window_entries == 0


@pytest.mark.integration
def test_redis_keeps_two_small_counters_per_bucket_when_the_rate_is_a_million(redis_url: str, bucket: str) -> None:
    # The regression test for a cost that grows with the limit: a moving window kept one list entry per admission
    # (5,000 admissions: a 90 kB list); the counter keeps two integers.
    async def scenario() -> int:
        limiter = RateLimiter.from_url(redis_url)
        try:
            return sum([(await limiter.acquire(bucket, 1_000_000)).allowed for _ in range(5_000)])
        finally:
            await limiter.close()

    assert asyncio.run(scenario()) == 5_000
    with redis.Redis.from_url(redis_url) as client:
        keys = [key for key in client.scan_iter(match=f"{REDIS_KEY_PREFIX}:*") if f"/{bucket}/".encode() in key]
        assert 1 <= len(keys) <= 2
        assert {client.type(key) for key in keys} == {b"string"}
        assert sum(int(client.memory_usage(key) or 0) for key in keys) < 512


@pytest.mark.integration
def test_acquire_shares_limits_own_sliding_window_when_limits_reads_the_same_redis(redis_url: str, bucket: str) -> None:
    # The script is limits' acquire_sliding_window.lua returning its counters: limits' own strategy must see,
    # and spend, the same budget on the same keys.
    async def scenario() -> tuple[int, bool, Decision, bool]:
        limiter = RateLimiter.from_url(redis_url)
        pool = ConnectionPool.from_url(redis_url)
        options: dict[str, Any] = {"connection_pool": pool}  # limits types its options as scalars
        storage = RedisStorage(f"async+{redis_url}", implementation="redispy", key_prefix=REDIS_KEY_PREFIX, **options)
        strategy = SlidingWindowCounterRateLimiter(storage)
        item = limit_for_rate(3)
        try:
            await _acquire_n(limiter, bucket, 3, 2)
            remaining = (await strategy.get_window_stats(item, bucket)).remaining
            limits_hit = await strategy.hit(item, bucket)
            ours = await limiter.acquire(bucket, 3)
            return remaining, limits_hit, ours, await strategy.hit(item, bucket)
        finally:
            await limiter.close()
            await pool.aclose()

    remaining, limits_hit, ours, limits_hit_again = asyncio.run(scenario())
    assert (remaining, limits_hit, limits_hit_again) == (1, True, False)
    assert not ours.allowed and ours.remaining == 0


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
            await _room_in_window(1, 1.0)  # whole windows: a partial first one would count a second budget
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
        await _room_in_window(2, 1.5)
        limiter = RateLimiter.from_url(backend_url)
        try:
            return await _acquire_n(limiter, bucket, 2.5, 6)
        finally:
            await limiter.close()

    decisions = asyncio.run(scenario())
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[-1].limit == 5 and decisions[-1].window_s == 2
    assert 1.0 < decisions[-1].reset_after <= 2.0  # the window's end, when its 5 start to fade
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
