"""Issue 11's promises through the gateway and the real tritonserver, on the demo config's encoder services:
big requests succeed from the first request after start, a request queued past queue_timeout is refused with 503,
an arrival that cannot be served in time is refused at once, and nothing is answered late. Nothing here is timed
beyond what the promise itself says (the benchmark measures the rest: python -m benchmarks.overload)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.settings import GatewaySettings
from tests.gateway_server import GatewayServer
from tests.helpers import compiled_triton, metrics_text, sample_value

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parent.parent


def demo_encoders(models: dict[str, Path]) -> dict[str, Any]:
    """config.yaml's embedding and reranker services as they are, plus one narrow service for the refusal tests:
    one row a batch, a queue budget of 50 ms."""
    demo = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    minilm = str(models["all-MiniLM-L6-v2"])
    services = {name: demo["services"][name] for name in ("embedding_service", "reranker_service")}
    services["tight_service"] = {"model": "embedding_v1", "runtime": {
        "batch_size": 1, "batch_timeout": 0.001, "worker_count": 1, "queue_timeout": 0.05, "inference_timeout": 0.5,
        "total_timeout": 1.0, "rate_limit": 10_000, "max_queue_size": 100, "enable_cache": False,
    }}
    models_ = {name: {**demo["models"][name], "model_name": minilm} for name in ("embedding_v1", "reranker_v1")}
    return {"models": models_, "services": services}


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("demo-encoders")
    with compiled_triton(root, demo_encoders(demo_models), export_cache) as (triton, repository):
        gateway_settings = GatewaySettings.from_repository(repository, triton_grpc=triton.grpc_url, environ={})
        with GatewayServer(gateway_settings) as server:
            yield server.url


def texts(count: int, tag: str) -> list[str]:
    return [f"{tag} {i}: a paragraph about model serving, batches, queues and deadlines " * 3 for i in range(count)]


def test_first_request_after_start_embeds_1000_texts_when_the_demo_config_serves(gateway: str) -> None:
    response = httpx.post(f"{gateway}/v1/embeddings", json={"model": "embedding_service", "input": texts(1000, "big")},
                          timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1000


def test_first_rerank_after_start_scores_100_documents_when_the_demo_config_serves(gateway: str) -> None:
    response = httpx.post(f"{gateway}/v1/rerank", json={"model": "reranker_service", "query": "model serving",
                                                        "documents": texts(100, "doc")}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 100


def flood(gateway: str, count: int, tag: str) -> list[tuple[httpx.Response, float]]:
    """``count`` concurrent single-text requests to tight_service: each answer and how long it took."""

    async def one(http: httpx.AsyncClient, text: str) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await http.post("/v1/embeddings", json={"model": "tight_service", "input": text})
        return response, time.monotonic() - started

    async def all_of_them() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=gateway, timeout=30, limits=limits) as http:
            return await asyncio.gather(*(one(http, text) for text in texts(count, tag)))

    return asyncio.run(all_of_them())


def refused(gateway: str, reason: str) -> float:
    return sample_value(metrics_text(f"{gateway}/metrics"), "sluice_gateway_refused_total", service="tight_service",
                        reason=reason)


def test_requests_queued_past_queue_timeout_and_arrivals_that_cannot_start_in_time_get_503(gateway: str) -> None:
    # The service's first flood: nothing measured yet, so every request is queued, and those still waiting at
    # their 50 ms queue_timeout are refused then.
    first = flood(gateway, 24, "first flood")
    assert refused(gateway, "queue_timeout") >= 1
    # Now the service knows what a call costs: a flood's tail is refused on arrival, before any wait.
    second = flood(gateway, 24, "second flood")
    assert refused(gateway, "too_late") >= 1
    for response, seconds in first + second:
        assert response.status_code in (200, 503), response.text
        assert seconds < 1.0  # total_timeout: nothing is answered late, nothing times out
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
            assert "queue_timeout" in response.json()["error"]["message"] or "in time" in response.json()["error"][
                "message"]
    assert any(response.status_code == 200 for response, _ in first + second)
