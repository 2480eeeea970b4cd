"""What one rate-limit decision costs the gateway process, and Redis, at a small and at a huge rate limit.

    python -m benchmarks.ratelimit_cost [--acquires 20000] [--rates 100,1000000] [--backends memory,redis]
                                        [--redis-url redis://...] [--json FILE]

For each backend and rate: one :class:`gateway.ratelimit.RateLimiter` (as the gateway builds it, on uvloop as the
gateway runs), one fresh bucket, ``--acquires`` sequential ``acquire`` calls as fast as they go, yielding to the
event loop between them as requests do (``asyncio.sleep(0)``, counted). Reported per acquire: the gateway process's
CPU (``time.process_time``: every thread, so limits' sweeps count), wall time, redis-server's CPU (``INFO cpu``,
user + sys) and the admitted share; and the bucket's Redis keys' size afterwards (``MEMORY USAGE``). At 100/s nearly
every acquire is refused; at 1,000,000/s every one is admitted, and a strategy whose state grows with the limit
shows it. Without ``--redis-url`` a throwaway redis-server is started (tests/redis_server.py). Run it alone: on
2 cores anything else skews every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import redis
import uvloop

from gateway.ratelimit import REDIS_KEY_PREFIX, RateLimiter
from tests.redis_server import running_redis


@dataclass(frozen=True)
class Cost:
    backend: str
    rate: float
    acquires: int
    admitted: int
    cpu_us: float  # gateway-process CPU per acquire
    wall_us: float
    redis_cpu_us: float | None  # redis-server CPU per acquire
    redis_key_bytes: int | None  # MEMORY USAGE of the bucket's keys, summed, after the run


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def bucket_key_bytes(client: redis.Redis, bucket: str) -> int:
    keys = client.keys(f"{REDIS_KEY_PREFIX}:*{bucket}*")
    return sum(int(client.memory_usage(key) or 0) for key in keys)


async def measure(backend: str, redis_url: str | None, rate: float, acquires: int) -> Cost:
    bucket = f"bench:{backend}:{rate:g}:{time.time_ns()}"
    limiter = RateLimiter.from_url(redis_url)
    client = redis.Redis.from_url(redis_url) if redis_url else None
    try:
        await limiter.acquire(bucket, rate)  # connect and load the scripts outside the measurement
        redis_before = redis_cpu_seconds(client) if client else 0.0
        admitted, cpu_start, wall_start = 0, time.process_time(), time.perf_counter()
        for _ in range(acquires):
            admitted += (await limiter.acquire(bucket, rate)).allowed
            await asyncio.sleep(0)  # let tasks the limiter started run, as they would between requests
        cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
        redis_cpu = redis_cpu_seconds(client) - redis_before if client else None
        key_bytes = bucket_key_bytes(client, bucket) if client else None
    finally:
        await limiter.close()
        if client:
            client.close()
    return Cost(
        backend=backend,
        rate=rate,
        acquires=acquires,
        admitted=admitted,
        cpu_us=1e6 * cpu / acquires,
        wall_us=1e6 * wall / acquires,
        redis_cpu_us=None if redis_cpu is None else 1e6 * redis_cpu / acquires,
        redis_key_bytes=key_bytes,
    )


@contextlib.contextmanager
def redis_for(backends: list[str], redis_url: str | None) -> Iterator[str | None]:
    if "redis" not in backends or redis_url:
        yield redis_url
    else:
        with running_redis() as url:
            yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acquires", type=int, default=20_000)
    parser.add_argument("--rates", default="100,1000000")
    parser.add_argument("--backends", default="memory,redis")
    parser.add_argument("--redis-url")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    backends = args.backends.split(",")
    rates = [float(rate) for rate in args.rates.split(",")]
    costs = []
    with redis_for(backends, args.redis_url) as url:
        for backend in backends:
            for rate in rates:
                cost = uvloop.run(measure(backend, url if backend == "redis" else None, rate, args.acquires))
                costs.append(cost)
                redis_part = (
                    f"  redis-server {cost.redis_cpu_us:6.1f} us/acquire, keys {cost.redis_key_bytes} B"
                    if cost.redis_cpu_us is not None
                    else ""
                )
                print(
                    f"{backend:6} rate {rate:>9g}/s: gateway CPU {cost.cpu_us:6.1f} us/acquire, "
                    f"wall {cost.wall_us:6.1f} us, admitted {cost.admitted}/{cost.acquires}{redis_part}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([asdict(cost) for cost in costs], out, indent=2)


if __name__ == "__main__":
    main()
