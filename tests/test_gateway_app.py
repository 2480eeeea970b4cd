"""The gateway app's error path and deadlines, against a fake Triton (tests/gateway_fakes.py): no tritonserver."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tests.gateway_fakes import FakeTriton, route, serve
from tests.helpers import sample_value

LLM = route("llm", "llm")


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def events_of(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]


async def deadlines_counted(client: httpx.AsyncClient, service: str) -> float:
    metrics = await client.get("/metrics")
    return sample_value(metrics.text, "sluice_gateway_deadline_exceeded_total", service=service)


def test_deadline_counter_counts_a_stream_once_when_total_timeout_passes_mid_stream() -> None:
    slow = FakeTriton(pieces=["word"] * 100, piece_interval=0.02)

    async def scenario() -> tuple[httpx.Response, float]:
        async with serve(slow, route("llm", "llm", total_timeout=0.2)) as client:
            response = await client.post("/v1/completions", json={"model": "llm", "prompt": "go on", "stream": True})
            return response, await deadlines_counted(client, "llm")

    response, counted = asyncio.run(scenario())
    events = events_of(response)
    assert response.status_code == 200 and len(events) > 3  # it streamed text first
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    assert counted == 1


def test_deadline_counter_counts_a_whole_response_once_when_total_timeout_passes() -> None:
    slow = FakeTriton(pieces=["word"] * 100, piece_interval=0.02)

    async def scenario() -> tuple[httpx.Response, float]:
        async with serve(slow, route("llm", "llm", total_timeout=0.2)) as client:
            response = await client.post("/v1/completions", json={"model": "llm", "prompt": "go on"})
            return response, await deadlines_counted(client, "llm")

    response, counted = asyncio.run(scenario())
    assert response.status_code == 504 and error_of(response)["code"] == "deadline_exceeded"
    assert counted == 1


def test_deadline_counter_stays_at_zero_when_a_stream_finishes_in_time() -> None:
    async def scenario() -> tuple[httpx.Response, float]:
        async with serve(FakeTriton(), LLM) as client:
            response = await client.post("/v1/completions", json={"model": "llm", "prompt": "hi", "stream": True})
            return response, await deadlines_counted(client, "llm")

    response, counted = asyncio.run(scenario())
    events = events_of(response)
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["Hello", " world", ""]
    assert counted == 0


def test_ready_answers_503_envelope_with_retry_after_when_a_service_is_not_ready() -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with serve(FakeTriton(not_ready=["llm"]), LLM, route("emb", "embedding")) as client:
            return await client.get("/ready"), await client.get("/health")

    ready, health = asyncio.run(scenario())
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    error = error_of(ready)
    assert error["code"] == "unavailable" and "llm" in error["message"] and "emb" not in error["message"]
    assert health.status_code == 200


def test_ready_lists_the_services_when_every_one_is_ready() -> None:
    async def scenario() -> httpx.Response:
        async with serve(FakeTriton(), LLM, route("emb", "embedding")) as client:
            return await client.get("/ready")

    ready = asyncio.run(scenario())
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "services": ["emb", "llm"]}


def test_unknown_path_and_wrong_method_get_the_error_envelope_when_routed() -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with serve(FakeTriton(), LLM) as client:
            return await client.get("/v1/nowhere"), await client.get("/v1/completions")

    missing, wrong_method = asyncio.run(scenario())
    assert missing.status_code == 404
    assert error_of(missing) == {"message": "no route /v1/nowhere", "type": "invalid_request_error", "param": None,
                                 "code": "not_found"}
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert error_of(wrong_method) == {"message": "Method Not Allowed", "type": "invalid_request_error",
                                      "param": None, "code": None}


def test_completion_refuses_max_tokens_past_int32_with_422_when_sent_as_a_huge_float() -> None:
    triton = FakeTriton()

    async def scenario() -> list[httpx.Response]:
        async with serve(triton, LLM) as client:
            return [await client.post("/v1/completions", json={"model": "llm", "prompt": "hi", "max_tokens": huge})
                    for huge in (1e30, 1e10)]

    for response in asyncio.run(scenario()):
        assert response.status_code == 422, response.text
        assert error_of(response)["param"] == "max_tokens"
    assert triton.streamed == []  # never sent
