"""The gateway against the real stack: a real tritonserver, the gateway served by uvicorn on a loopback port, and
(for shared budgets) a real redis-server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from benchmarks.bare_forwarder import forwarder
from gateway.batcher import Batcher
from gateway.errors import GatewayError
from gateway.settings import GatewaySettings, Route
from gateway.triton import Triton, text_column
from runtimes.signatures import output_names
from sluice.triton_server import TritonServer, free_ports
from tests.gateway_server import AppServer, GatewayServer
from tests.helpers import compiled_triton, metrics_text, sample_value

pytestmark = pytest.mark.integration

FAST = {"rate_limit": 1000.0}
API_KEY = "sk-test-0123456789abcdef"


def gateway_config(models: dict[str, Path]) -> dict[str, Any]:
    minilm = str(models["all-MiniLM-L6-v2"])
    return {
        "models": {
            "minilm": {"type": "embedding", "model_name": minilm},
            "minilm_ranker": {"type": "reranker", "model_name": minilm},
            "tiny_llm": {"type": "llm", "model_name": str(models["tiny-llm"]), "max_length": 2048},
        },
        "services": {
            # batch_size 4: a client batch of 10 texts must become 3 Triton requests.
            "embedding_service": {"model": "minilm", "runtime": {**FAST, "batch_size": 4, "worker_count": 1,
                                                                 "queue_timeout": 0.5, "inference_timeout": 1.0,
                                                                 "total_timeout": 2.0}},
            "reranker_service": {"model": "minilm_ranker", "runtime": {**FAST, "worker_count": 1,
                                                                       "enable_cache": True}},
            "llm_service": {"model": "tiny_llm", "runtime": {**FAST, "inference_timeout": 5.0, "total_timeout": 6.0}},
            # 10 requests per second, for the rate-limit tests (cache on: admitted requests cost Triton nothing).
            "limited_service": {"model": "minilm", "runtime": {"rate_limit": 10.0, "worker_count": 1,
                                                               "queue_timeout": 0.2, "total_timeout": 1.0}},
            # A generation cut short by inference_timeout.
            "hasty_llm": {"model": "tiny_llm", "runtime": {**FAST, "inference_timeout": 0.4, "total_timeout": 2.0,
                                                          "queue_timeout": 0.2}},
            # One instance, one request at a time, a queue of 1: floods are turned away by the gateway.
            "narrow_service": {"model": "minilm", "runtime": {**FAST, "worker_count": 1, "batch_size": 1,
                                                              "batch_timeout": 0.0001, "max_queue_size": 1,
                                                              "queue_timeout": 3.0, "inference_timeout": 3.0,
                                                              "total_timeout": 6.0}},
        },
        "gateway": {"api_keys": [], "max_items": 64, "max_request_bytes": 65536},
    }


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path
) -> Iterator[tuple[TritonServer, Path]]:
    with compiled_triton(tmp_path_factory.mktemp("gateway-stack"), gateway_config(demo_models), export_cache) as stack:
        yield stack


@pytest.fixture(scope="module")
def settings(stack: tuple[TritonServer, Path]) -> GatewaySettings:
    triton, repository = stack
    return GatewaySettings.from_repository(repository, triton_grpc=triton.grpc_url, environ={})


@pytest.fixture(scope="module")
def gateway(settings: GatewaySettings) -> Iterator[str]:
    with GatewayServer(settings) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        yield http


def triton_metric(triton: TritonServer, name: str, **labels: str) -> float:
    return sample_value(metrics_text(triton.metrics_url), name, **labels)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


# ---- endpoints ---------------------------------------------------------------------------------------------------


def test_embeddings_split_a_large_batch_into_requests_triton_accepts_when_above_batch_size(
    client: httpx.Client, stack: tuple[TritonServer, Path]
) -> None:
    triton, _ = stack
    texts = [f"sentence number {i} about splitting" for i in range(10)]
    before = triton_metric(triton, "nv_inference_request_success", model="embedding_service")
    whole = client.post("/v1/embeddings", json={"model": "embedding_service", "input": texts},
                        headers={"cache-control": "no-cache"})
    assert whole.status_code == 200, whole.text
    after = triton_metric(triton, "nv_inference_request_success", model="embedding_service")
    assert after - before == 3  # 4 + 4 + 2 rows
    data = whole.json()["data"]
    assert [item["index"] for item in data] == list(range(10))
    alone = client.post("/v1/embeddings", json={"model": "embedding_service", "input": texts[7]},
                        headers={"cache-control": "no-cache"}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(data[7]["embedding"], alone, atol=1e-5)
    assert whole.json()["usage"]["prompt_tokens"] > 10


def test_the_benchmarks_bare_forwarder_answers_the_embedding_the_gateway_answers(
    client: httpx.Client, stack: tuple[TritonServer, Path]
) -> None:
    triton, _ = stack
    body = {"model": "embedding_service", "input": ["forwarded as it is"]}
    with AppServer(forwarder(triton.grpc_url)) as bare:
        forwarded = httpx.post(f"{bare.url}/v1/embeddings", json=body, timeout=30)
        unknown = httpx.post(f"{bare.url}/v1/embeddings", json={**body, "model": "no_such_service"}, timeout=30)
    assert forwarded.status_code == 200, forwarded.text
    served = client.post("/v1/embeddings", json=body, headers={"cache-control": "no-cache"}).json()
    np.testing.assert_allclose(forwarded.json()["data"][0]["embedding"], served["data"][0]["embedding"], atol=1e-5)
    assert unknown.status_code >= 400 and "no_such_service" in unknown.json()["error"]["message"]


def test_embeddings_encode_base64_as_little_endian_float32_when_asked(client: httpx.Client) -> None:
    floats = client.post("/v1/embeddings", json={"model": "embedding_service", "input": "base64 please"}).json()
    packed = client.post("/v1/embeddings", json={"model": "embedding_service", "input": "base64 please",
                                                 "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], atol=1e-7)


def test_rerank_sorts_by_relevance_and_cuts_to_top_n_when_given_both_document_shapes(client: httpx.Client) -> None:
    documents = ["The stock market fell.", {"text": "Cats eat fish and meat."}, "Paris is in France."]
    response = client.post("/v1/rerank", json={"model": "reranker_service", "query": "What do cats eat?",
                                               "documents": documents, "top_n": 2, "return_documents": True})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    assert results[0]["index"] == 1 and results[0]["document"] == {"text": "Cats eat fish and meat."}
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    cohere = client.post("/v2/rerank", json={"model": "minilm_ranker", "query": "q", "documents": ["a", "b"]})
    assert cohere.status_code == 200 and "document" not in cohere.json()["results"][0]


def test_models_lists_every_service_when_asked(client: httpx.Client) -> None:
    ids = {model["id"] for model in client.get("/v1/models").json()["data"]}
    assert {"embedding_service", "reranker_service", "llm_service", "limited_service"} <= ids


def test_health_ready_and_metrics_answer_when_the_stack_is_up(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "alive"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and "llm_service" in ready.json()["services"]
    client.post("/v1/embeddings", json={"model": "embedding_service", "input": "count me"})
    metrics = client.get("/metrics").text
    assert 'sluice_gateway_requests_total{endpoint="/v1/embeddings",service="embedding_service",status="200"}' in (
        metrics
    )
    assert "sluice_gateway_triton_seconds_bucket" in metrics


def test_unknown_model_is_a_404_naming_the_choices_when_requested(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", json={"model": "gpt-9", "input": "x"})
    assert response.status_code == 404
    error = error_of(response)
    assert error["param"] == "model" and "embedding_service" in error["message"] and "gpt-9" in error["message"]


# ---- the official OpenAI client -----------------------------------------------------------------------------------


def test_openai_client_embeds_completes_and_streams_chat_when_pointed_at_the_gateway(gateway: str) -> None:
    ai = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    embedded = ai.embeddings.create(model="embedding_service", input=["hello", "world"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 384
    assert abs(np.linalg.norm(embedded.data[1].embedding) - 1) < 1e-4
    completion = ai.completions.create(model="llm_service", prompt="Once upon", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    stream = ai.chat.completions.create(
        model="llm_service", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    whole = ai.chat.completions.create(model="llm_service", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0)
    assert whole.choices[0].message.content == text  # greedy: the same text, streamed or not


# ---- rate limits ----------------------------------------------------------------------------------------------------


def admitted_under_load(urls: list[str], rate: float, seconds: float) -> tuple[int, list[httpx.Response]]:
    """Send ``rate`` requests per second for ``seconds``, round-robin over ``urls``; count the 200s."""
    body = {"model": "limited_service", "input": "the same text each time"}
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool, httpx.Client(timeout=10) as http:
        def send(url: str) -> None:
            response = http.post(f"{url}/v1/embeddings", json=body)
            with lock:
                responses.append(response)

        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            pool.submit(send, urls[i % len(urls)])
    admitted = sum(1 for r in responses if r.status_code == 200)
    return admitted, responses


def test_rate_limit_admits_the_configured_rate_when_offered_three_times_as_much(gateway: str) -> None:
    httpx.post(f"{gateway}/v1/embeddings", json={"model": "limited_service", "input": "the same text each time"})
    time.sleep(1.1)  # a fresh window, and the text is cached: Triton is not what limits the rate
    admitted, responses = admitted_under_load([gateway], rate=30, seconds=6)
    refused = [r for r in responses if r.status_code == 429]
    assert admitted + len(refused) == len(responses)
    # 10/s for 6 s; the first window may start full.
    assert 54 <= admitted <= 70, admitted
    sample = refused[0]
    assert int(sample.headers["retry-after"]) >= 1
    assert sample.headers["x-ratelimit-limit"] == "10" and sample.headers["x-ratelimit-remaining"] == "0"
    assert error_of(sample)["type"] == "rate_limit_error"


def test_two_gateways_sharing_redis_admit_one_budget_when_loaded_together(
    settings: GatewaySettings, redis_url: str
) -> None:
    shared = replace(settings, redis_url=redis_url)
    with GatewayServer(shared) as first, GatewayServer(shared) as second:
        httpx.post(f"{first.url}/v1/embeddings", json={"model": "limited_service", "input": "the same text each time"})
        time.sleep(1.1)
        admitted, responses = admitted_under_load([first.url, second.url], rate=30, seconds=6)
    assert {r.status_code for r in responses} == {200, 429}
    assert 54 <= admitted <= 70, admitted  # one budget of 10/s, not two


# ---- requests queued in the gateway, sent as batches -----------------------------------------------------------------

EMBED_OUTPUTS = ("embedding", "tokens", "truncated")


Scenario = Callable[[Batcher, Route, Triton, list[tuple[str, int]]], Awaitable[Any]]


def run_batched(triton_url: str, route: Route, scenario: Scenario, triton_wrapper: Any = None) -> Any:
    """``scenario(batcher, route, triton, calls)`` in an event loop, against the real Triton; ``calls`` records each
    Triton call the batcher makes as (service, chunks)."""

    async def main() -> Any:
        triton = Triton(triton_url)
        calls: list[tuple[str, int]] = []
        try:
            batcher = Batcher(triton_wrapper(triton) if triton_wrapper else triton, {route.service: route},
                              output_names, on_call=lambda s, n: calls.append((s, n)))
            return await scenario(batcher, route, triton, calls)
        finally:
            await triton.close()

    return asyncio.run(main())


def queued(batcher: Batcher, route: Route, *chunks: list[str]) -> Awaitable[list[Any]]:
    now = time.monotonic()
    return batcher.infer(route, [{"text": text_column(texts)} for texts in chunks], now, now + 5)


def test_batcher_sends_waiting_requests_as_few_triton_requests_and_gives_each_its_own_rows(
    stack: tuple[TritonServer, Path], settings: GatewaySettings
) -> None:
    triton_server, _ = stack
    route = settings.routes["embedding_service"].model_copy(update={"batch_timeout": 0.05})  # batch_size 4
    texts = [[f"merge probe {time.time_ns()} {i}-{j}" for j in range(rows)] for i, rows in enumerate((3, 1, 2, 1, 1))]

    async def scenario(batcher: Batcher, route: Route, triton: Triton, calls: list[tuple[str, int]]) -> Any:
        alone = [await triton.infer("embedding_service", {"text": text_column(t)}, EMBED_OUTPUTS, 5) for t in texts]
        requests_before = triton_metric(triton_server, "nv_inference_request_success", model="embedding_service")
        batched = await asyncio.gather(*(queued(batcher, route, t) for t in texts))
        requests = triton_metric(triton_server, "nv_inference_request_success", model="embedding_service")
        return alone, [answer[0] for answer in batched], requests - requests_before, calls

    alone, batched, requests, calls = run_batched(triton_server.grpc_url, route, scenario)
    # Held for batch_timeout, then in arrival order at most 4 rows a request: 3 + 1, then 2 + 1 + 1.
    assert calls == [("embedding_service", 2), ("embedding_service", 3)]
    assert requests == 2
    for solo, together, sent in zip(alone, batched, texts, strict=True):
        assert together["embedding"].shape == (len(sent), 384)
        np.testing.assert_allclose(together["embedding"], solo["embedding"], atol=1e-5)
        np.testing.assert_array_equal(together["tokens"], solo["tokens"])


class WatchedTriton:
    """The real Triton, noting when an ``infer`` call starts and when one is cancelled while it waits for Triton."""

    def __init__(self, triton: Triton) -> None:
        self.triton = triton
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        try:
            return await self.triton.infer(*args, **kwargs)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_batcher_cancels_the_triton_call_when_every_caller_leaves(
    stack: tuple[TritonServer, Path], settings: GatewaySettings
) -> None:
    triton_server, _ = stack
    route = settings.routes["embedding_service"].model_copy(update={"batch_timeout": 0.01})
    watched: list[WatchedTriton] = []

    def watch(triton: Triton) -> WatchedTriton:
        watched.append(WatchedTriton(triton))
        return watched[0]

    async def scenario(batcher: Batcher, route: Route, triton: Triton, calls: list[tuple[str, int]]) -> Any:
        callers = [asyncio.ensure_future(queued(batcher, route, [f"all leave {time.time_ns()} {i}"]))
                   for i in range(2)]
        await watched[0].started.wait()  # sent, and waiting on Triton
        for caller in callers:
            caller.cancel()
        await asyncio.wait_for(watched[0].cancelled.wait(), timeout=5)
        await asyncio.gather(*callers, return_exceptions=True)
        return calls, [caller.cancelled() for caller in callers]

    calls, left = run_batched(triton_server.grpc_url, route, scenario, triton_wrapper=watch)
    assert calls == [("embedding_service", 2)] and left == [True, True]


def test_batcher_gives_every_caller_tritons_refusal_when_the_call_fails(
    stack: tuple[TritonServer, Path], settings: GatewaySettings
) -> None:
    triton_server, _ = stack
    route = settings.routes["embedding_service"].model_copy(update={"service": "no_such_service",
                                                                   "batch_timeout": 0.01})

    async def scenario(batcher: Batcher, route: Route, triton: Triton, calls: list[tuple[str, int]]) -> Any:
        return await asyncio.gather(*(queued(batcher, route, [f"refused {i}"]) for i in range(3)),
                                    return_exceptions=True)

    outcomes = run_batched(triton_server.grpc_url, route, scenario)
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert isinstance(outcome, GatewayError) and "no_such_service" in str(outcome)


def test_concurrent_embedding_requests_each_get_their_own_embedding_when_merged(
    gateway: str, client: httpx.Client
) -> None:
    texts = [f"concurrent client {time.time_ns()} {i}" for i in range(12)]
    alone = [client.post("/v1/embeddings", json={"model": "embedding_service", "input": text},
                         headers={"cache-control": "no-cache"}).json()["data"][0]["embedding"] for text in texts]
    merged_before = sample_value(metrics_text(f"{gateway}/metrics"), "sluice_gateway_triton_call_requests_sum",
                                 service="embedding_service")

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
            return await asyncio.gather(*(
                http.post("/v1/embeddings", json={"model": "embedding_service", "input": text},
                          headers={"cache-control": "no-cache"}) for text in texts))

    responses = asyncio.run(together())
    for response, solo in zip(responses, alone, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["data"][0]["embedding"], solo, atol=1e-5)
    merged = sample_value(metrics_text(f"{gateway}/metrics"), "sluice_gateway_triton_call_requests_sum",
                          service="embedding_service")
    assert merged - merged_before == len(texts)  # every request went to Triton in some call, once


# ---- the item cache -------------------------------------------------------------------------------------------------


def test_cache_answers_repeated_items_and_sends_only_misses_when_a_request_partly_hits(
    client: httpx.Client, stack: tuple[TritonServer, Path]
) -> None:
    triton, _ = stack
    texts = [f"cache probe {time.time_ns()} {i}" for i in range(3)]
    first = client.post("/v1/embeddings", json={"model": "embedding_service", "input": texts[:2]})
    assert first.headers["x-sluice-cache-hits"] == "0" and first.headers["x-sluice-cache-misses"] == "2"
    rows_before = triton_metric(triton, "nv_inference_count", model="embedding_service")
    second = client.post("/v1/embeddings", json={"model": "embedding_service", "input": texts})
    assert second.json()["cache"] == {"hits": 2, "misses": 1}
    assert triton_metric(triton, "nv_inference_count", model="embedding_service") - rows_before == 1
    for index in (0, 1):
        np.testing.assert_allclose(second.json()["data"][index]["embedding"], first.json()["data"][index]["embedding"])
    bypass = client.post("/v1/embeddings", json={"model": "embedding_service", "input": texts},
                         headers={"cache-control": "no-cache"})
    assert bypass.json()["cache"] == {"hits": 0, "misses": 3}


def test_cache_keeps_rerank_scores_per_query_and_document_when_enabled(client: httpx.Client) -> None:
    body = {"model": "reranker_service", "query": f"probe {time.time_ns()}", "documents": ["one", "two"]}
    first = client.post("/v1/rerank", json=body).json()
    again = client.post("/v1/rerank", json={**body, "documents": ["two", "three"]}).json()
    assert again["cache"] == {"hits": 1, "misses": 1}
    assert {r["index"]: r["relevance_score"] for r in again["results"]}[0] == pytest.approx(
        {r["index"]: r["relevance_score"] for r in first["results"]}[1]
    )


# ---- deadlines ------------------------------------------------------------------------------------------------------


# A prompt the tiny LLM continues, under greedy decoding, until max_tokens (1900 tokens, about 1.8 s on 2 cores)
# without an end-of-sequence token. Others end sooner: "Tell me everything" at 252 tokens, within 0.4 s.
LONG_PROMPT = "hello world"


def llm_outcomes(triton: TritonServer, service: str) -> dict[str, float]:
    return {reason: triton_metric(triton, "sluice_llm_requests_finished_total", model=service, reason=reason)
            for reason in ("cancelled", "timeout", "length", "stop")}


def wait_for_end(triton: TritonServer, service: str, before: dict[str, float]) -> dict[str, float]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = llm_outcomes(triton, service)
        if now["cancelled"] + now["timeout"] > before["cancelled"] + before["timeout"]:
            return now
        time.sleep(0.05)
    pytest.fail(f"{service}: the generation was not stopped at Triton")


def deadlines_counted(gateway: str, service: str) -> float:
    return sample_value(metrics_text(f"{gateway}/metrics"), "sluice_gateway_deadline_exceeded_total", service=service)


def test_inference_timeout_gives_504_and_stops_generation_when_a_call_runs_long(
    gateway: str, client: httpx.Client, stack: tuple[TritonServer, Path]
) -> None:
    triton, _ = stack
    before = llm_outcomes(triton, "hasty_llm")
    counted_before = deadlines_counted(gateway, "hasty_llm")
    started = time.monotonic()
    response = client.post("/v1/completions", json={"model": "hasty_llm", "prompt": LONG_PROMPT,
                                                    "max_tokens": 1900, "temperature": 0})
    assert response.status_code == 504 and time.monotonic() - started < 1.5
    assert error_of(response)["code"] == "deadline_exceeded"
    assert deadlines_counted(gateway, "hasty_llm") - counted_before == 1
    after = wait_for_end(triton, "hasty_llm", before)
    assert after["length"] == before["length"]  # it never ran to the end


def stream_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    """The data of each server-sent event of a streamed response (a 200)."""
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_a_deadline_ends_a_stream_with_an_error_event_when_it_passes(
    gateway: str, client: httpx.Client, stack: tuple[TritonServer, Path]
) -> None:
    triton, _ = stack
    before = llm_outcomes(triton, "hasty_llm")
    counted_before = deadlines_counted(gateway, "hasty_llm")
    body = {"model": "hasty_llm", "prompt": LONG_PROMPT, "max_tokens": 1900, "temperature": 0,
            "stream": True}
    events = stream_events(client, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "deadline_exceeded"
    assert len(events) > 3  # it streamed text first
    assert deadlines_counted(gateway, "hasty_llm") - counted_before == 1
    wait_for_end(triton, "hasty_llm", before)


def test_a_total_timeout_passing_mid_stream_is_counted_as_a_deadline_when_it_ends_the_stream(
    settings: GatewaySettings, stack: tuple[TritonServer, Path]
) -> None:
    triton, _ = stack
    llm = settings.routes["llm_service"]
    # Only the gateway's deadline is cut (Triton's inference_timeout stays 5 s): the stream outlives it.
    hurried = replace(settings, routes={**settings.routes,
                                        "llm_service": llm.model_copy(update={"total_timeout": 0.5})})
    before = llm_outcomes(triton, "llm_service")
    body = {"model": "llm_service", "prompt": LONG_PROMPT, "max_tokens": 1900, "temperature": 0,
            "stream": True}
    with GatewayServer(hurried) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        events = stream_events(http, "/v1/completions", body)
        counted = deadlines_counted(server.url, "llm_service")
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    assert len(events) > 3  # it streamed text first
    assert counted == 1
    wait_for_end(triton, "llm_service", before)


def test_total_timeout_counts_from_arrival_when_the_body_arrives_slowly(gateway: str) -> None:
    body = json.dumps({"model": "limited_service", "input": "slow upload"}).encode()
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(1.2)  # limited_service's total_timeout is 1.0 s
        sock.sendall(body[10:])
        reply = ""
        while not reply.endswith("}}"):
            reply += sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 504"), reply
    assert "total_timeout budget of 1 s" in reply


def test_client_disconnect_cancels_the_generation_when_a_stream_is_dropped(
    gateway: str, stack: tuple[TritonServer, Path]
) -> None:
    triton, _ = stack
    before = llm_outcomes(triton, "llm_service")
    body = json.dumps({"model": "llm_service", "prompt": LONG_PROMPT, "max_tokens": 1900,
                       "temperature": 0, "stream": True}).encode()
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        streaming = sample_value(metrics_text(f"{gateway}/metrics"), "sluice_gateway_in_flight", service="llm_service")
    after = wait_for_end(triton, "llm_service", before)
    assert after["cancelled"] > before["cancelled"]
    assert streaming == 1
    assert sample_value(metrics_text(f"{gateway}/metrics"), "sluice_gateway_in_flight", service="llm_service") == 0


# ---- refusals ---------------------------------------------------------------------------------------------------


def test_a_full_queue_refuses_with_503_and_retry_after_when_flooded(gateway: str) -> None:
    def one(i: int) -> httpx.Response:
        with httpx.Client(timeout=30) as http:
            return http.post(f"{gateway}/v1/embeddings", json={"model": "narrow_service",
                                                               "input": f"flood {i} " + "lorem ipsum " * 60})

    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(one, range(24)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused and any(r.status_code == 200 for r in responses)
    assert int(refused[0].headers["retry-after"]) >= 1
    assert "at most 1 may" in error_of(refused[0])["message"]  # max_queue_size, kept by the gateway
    metrics = metrics_text(f"{gateway}/metrics")
    assert sample_value(metrics, "sluice_gateway_refused_total", service="narrow_service", reason="queue_full") >= 1


def test_unreachable_triton_becomes_503_when_the_gateway_cannot_connect(settings: GatewaySettings) -> None:
    (dead,) = free_ports(1)
    with GatewayServer(replace(settings, triton_grpc=f"127.0.0.1:{dead}")) as server:
        response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "embedding_service", "input": "x"},
                              headers={"cache-control": "no-cache"}, timeout=10)
        assert response.status_code == 503 and error_of(response)["code"] == "unavailable"
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        assert error_of(ready)["code"] == "unavailable"


# ---- safety ---------------------------------------------------------------------------------------------------------


def test_api_keys_are_required_and_checked_when_configured(settings: GatewaySettings) -> None:
    keyed = replace(settings, key_digests=frozenset({hashlib.sha256(API_KEY.encode()).hexdigest()}))
    with GatewayServer(keyed) as server:
        body = {"model": "embedding_service", "input": "secret"}
        missing = httpx.post(f"{server.url}/v1/embeddings", json=body)
        wrong = httpx.post(f"{server.url}/v1/embeddings", json=body, headers={"authorization": "Bearer nope"})
        right = httpx.post(f"{server.url}/v1/embeddings", json=body, headers={"authorization": f"Bearer {API_KEY}"})
        assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
        assert error_of(wrong)["type"] == "authentication_error" and "nope" not in wrong.text
        assert httpx.get(f"{server.url}/health").status_code == 200  # open paths stay open


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (json.dumps({"model": "embedding_service", "input": ""}).encode(), 422, "input"),
        (json.dumps({"model": "embedding_service", "input": []}).encode(), 422, "input"),
        (json.dumps({"model": "embedding_service", "input": [1, 2]}).encode(), 422, "input.0"),
        (json.dumps({"model": "embedding_service", "input": "x", "encoding_format": "hex"}).encode(), 422,
         "encoding_format"),
        (json.dumps({"model": "embedding_service", "input": "x", "colour": "red"}).encode(), 422, "colour"),
        (json.dumps({"input": "x"}).encode(), 422, "model"),
        (json.dumps({"model": "embedding_service", "input": ["x"] * 65}).encode(), 413, "input"),
        (json.dumps({"model": "embedding_service", "input": "x" * 70000}).encode(), 413, None),
    ],
    ids=["invalid json", "empty string", "empty list", "token ids", "bad enum", "unknown field", "no model",
         "too many items", "body too large"],
)
def test_bad_embedding_requests_get_a_clear_error_naming_the_field_when_sent(
    client: httpx.Client, body: bytes, status: int, param: str | None
) -> None:
    response = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param
    if param:
        assert error["message"].startswith(param) or param in error["message"]


def test_bad_chat_and_rerank_requests_name_the_field_when_sent(client: httpx.Client) -> None:
    chat = client.post("/v1/chat/completions", json={"model": "llm_service", "messages": [{"role": "robot",
                                                                                           "content": "hi"}]})
    assert chat.status_code == 422 and error_of(chat)["param"] == "messages.0.role"
    rerank = client.post("/v1/rerank", json={"model": "reranker_service", "query": "q", "documents": [],
                                             "top_n": 1})
    assert rerank.status_code == 422 and error_of(rerank)["param"] == "documents"
    wrong_kind = client.post("/v1/rerank", json={"model": "llm_service", "query": "q", "documents": ["d"]})
    assert wrong_kind.status_code == 404
    for huge in (1e30, 1e10):  # whole floats: counts to pydantic, overflows to the INT32 max_tokens tensor
        overflow = client.post("/v1/completions", json={"model": "llm_service", "prompt": "hi", "max_tokens": huge})
        assert overflow.status_code == 422 and error_of(overflow)["param"] == "max_tokens"
