"""gateway.redis_failure: what requests get while a real redis-server is killed, and after it comes back.

The gateway app runs in process with a fake Triton (tests/gateway_fakes.py: only the gateway and Redis are under
test) and a real redis-server, killed with SIGKILL and restarted on the same port. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.app import create_app
from gateway.batcher import Batcher
from gateway.redis_link import PROBE_INTERVAL_S
from gateway.settings import GatewaySettings
from runtimes.signatures import output_names
from tests.gateway_fakes import FakeTriton, route
from tests.redis_server import REDIS_SERVER, RestartableRedis, free_port

pytestmark = pytest.mark.integration

RATE = 5.0  # 5 requests per 1 s window: a burst of 20 is limited whatever the machine's speed
BURST = 20
SERVICE = route("emb", "embedding", rate_limit=RATE, enable_cache=True)
BODY = {"model": "emb", "input": "hello"}


def sluice_keys(server: RestartableRedis) -> list[bytes]:
    with redis.Redis(port=server.port) as client:
        return list(client.keys("sluice:*"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server (.ci/run does)")
    server = RestartableRedis(free_port(), str(tmp_path))
    server.start()
    yield server
    server.kill()


def settings_for(redis_url: str, failure: str) -> GatewaySettings:
    return GatewaySettings(
        routes={"emb": SERVICE}, triton_grpc="127.0.0.1:1", host="127.0.0.1", port=8080, key_digests=frozenset(),
        key_rate_limit=None, redis_url=redis_url, cache_max_items=1000, max_request_bytes=65536, max_items=64,
        redis_failure=failure,  # type: ignore[arg-type]  # the tests pass "open" or "closed"
    )


@asynccontextmanager
async def gateway(redis_url: str, failure: str) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app (lifespan run, Triton faked) and a client of it; yields the client and the app's metrics."""
    triton = FakeTriton()
    triton.types["emb"] = "embedding"
    app = create_app(settings_for(redis_url, failure))
    async with app.router.lifespan_context(app):
        state = app.state.gateway
        batcher = Batcher(triton, {"emb": SERVICE}, output_names)  # type: ignore[arg-type]
        app.state.gateway = dataclasses.replace(state, triton=triton, batcher=batcher)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, state.metrics


async def burst(client: httpx.AsyncClient, count: int = BURST) -> list[httpx.Response]:
    return [await client.post("/v1/embeddings", json=BODY) for _ in range(count)]


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in responses:
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
    return counts


def sample(metrics: Any, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, f"{name} is not exported"
    return float(value)


async def wait_until_up(metrics: Any, timeout_s: float = 3 * PROBE_INTERVAL_S + 2) -> float:
    """Seconds until ``sluice_gateway_redis_up`` reads 1 again; fails past ``timeout_s``."""
    start = time.monotonic()
    while sample(metrics, "sluice_gateway_redis_up") != 1:
        assert time.monotonic() - start < timeout_s, "the gateway did not reconnect to Redis"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def link_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sluice.gateway" and "Redis" in r.getMessage()]


def test_open_mode_limits_each_replica_in_memory_while_redis_is_down_then_shares_again(
    redis_server: RestartableRedis, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with gateway(redis_server.url, "open") as (first, metrics), gateway(redis_server.url, "open") as (
            second, _,
        ):
            # Up: one budget for both replicas, in Redis.
            shared = statuses(await burst(first, BURST // 2) + await burst(second, BURST // 2))
            assert 5 <= shared.get(200, 0) <= 6 and set(shared) == {200, 429}, shared
            assert sluice_keys(redis_server)
            assert sample(metrics, "sluice_gateway_redis_up") == 1

            redis_server.kill()
            await asyncio.sleep(1.1)  # let the shared window pass: the memory budgets start whole
            down_first, down_second = statuses(await burst(first)), statuses(await burst(second))
            # No error: each replica spends its own budget, in memory, and limits to it.
            for down in (down_first, down_second):
                assert set(down) == {200, 429} and 5 <= down[200] <= 6, down
            assert sample(metrics, "sluice_gateway_redis_up") == 0
            # One failed call marked Redis down; the 20 requests after it did not try Redis (pings come 1 s apart).
            assert 1 <= sample(metrics, "sluice_gateway_redis_failures_total") <= 2
            down_lines = link_lines(caplog)
            assert len(down_lines) == 2, down_lines  # one line per replica, not one per request
            assert all("cannot be reached" in line for line in down_lines)

            redis_server.start()
            assert await wait_until_up(metrics) <= PROBE_INTERVAL_S + 1.5
            await asyncio.sleep(PROBE_INTERVAL_S + 0.5)  # the second replica's ping too
            await asyncio.sleep(1.1)
            again = statuses(await burst(first, BURST // 2) + await burst(second, BURST // 2))
            assert 5 <= again.get(200, 0) <= 6 and set(again) == {200, 429}, again  # one budget again
            assert sluice_keys(redis_server)
            assert sum("answers again after" in line for line in link_lines(caplog)) == 2

    with caplog.at_level(logging.INFO, logger="sluice.gateway"):
        asyncio.run(scenario())


def test_closed_mode_answers_503_naming_redis_while_it_is_down_then_recovers(
    redis_server: RestartableRedis, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with gateway(redis_server.url, "closed") as (client, metrics):
            assert (await client.post("/v1/embeddings", json=BODY)).status_code == 200
            redis_server.kill()
            refused = await burst(client, 5)
            assert statuses(refused) == {503: 5}
            for response in refused:
                assert "Redis" in response.json()["error"]["message"]
                assert response.headers["retry-after"] == "1"
            assert sample(metrics, "sluice_gateway_redis_up") == 0
            assert 1 <= sample(metrics, "sluice_gateway_redis_failures_total") <= 2
            assert len(link_lines(caplog)) == 1

            redis_server.start()
            await wait_until_up(metrics)
            assert (await client.post("/v1/embeddings", json=BODY)).status_code == 200

    with caplog.at_level(logging.INFO, logger="sluice.gateway"):
        asyncio.run(scenario())


@pytest.mark.parametrize(("failure", "status"), [("open", 200), ("closed", 503)])
@pytest.mark.parametrize("redis_down", ["refusing", "silent"])
def test_start_up_with_redis_down_is_quick_and_follows_redis_failure(
    failure: str, status: int, redis_down: str
) -> None:
    # refusing: nothing listens on the port. silent: the port accepts connections and never answers (a hung Redis).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1] if redis_down == "silent" else free_port()

    async def scenario() -> None:
        start = time.monotonic()
        async with gateway(f"redis://127.0.0.1:{port}/0", failure) as (client, metrics):
            assert time.monotonic() - start < 2  # one bounded ping, then serving
            assert sample(metrics, "sluice_gateway_redis_up") == 0
            answers = await burst(client, 3)
            assert statuses(answers) == {status: 3}
            assert 1 <= sample(metrics, "sluice_gateway_redis_failures_total") <= 2  # no call per request

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        silent.close()
