"""Bad input at scale: Schemathesis generates requests from the gateway's own /openapi.json, both fitting the
document (positive) and breaking it (negative: wrong types, missing fields, bodies that are not JSON), and sends
them to the app in process, with the fake Triton of tests/gateway_fakes.py behind it.

Every answer must be one the design allows: no 5xx but the designed 503 and 504, every error the one JSON envelope
(``{"error": {"message", "type", "param", "code"}}``, exactly), and every answer what the document says (status,
content type, body schema: Schemathesis's own checks). Each (operation, mode) runs a fixed number of examples with
Hypothesis derandomized and without its example database, so a run is the same run every time; all failures are
collected, then reported together.

SLUICE_FUZZ_EXAMPLES raises the examples per (operation, mode) for a longer run than the suite's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import AcceptedNegativeData, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.errors import ErrorEnvelope
from gateway.openapi import openapi_document
from gateway.responses import ChatCompletionChunk, CompletionChunk
from tests.gateway_fakes import FakeTriton, route, serve

EXAMPLES = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "100"))
MIN_CASES = 1000
DESIGNED_5XX = {503, 504}
# A body's `model` is replaced by the service its path serves half the time: a random name only reaches the 404.
SERVICE_OF_PATH = {"/v1/embeddings": "emb", "/v1/rerank": "rr", "/v2/rerank": "rr", "/v1/completions": "llm",
                   "/v1/chat/completions": "llm"}
ROUTES = (route("emb", "embedding"), route("rr", "reranker"), route("llm", "llm"))
# not_a_server_error is left to the envelope check below, which allows the designed 503 and 504.
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
# A stream's events are checked here: the document gives the schema of each event's `data` (a chunk as JSON, or
# the envelope), where Schemathesis validates the whole parsed event ({"data": "<json text>", "event": ...}).
STREAM_CHECKS = [status_code_conformance, content_type_conformance]
CHUNK_OF_PATH = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


@dataclass
class FuzzRun:
    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # Negative cases answered 200: Schemathesis's schema says invalid, pydantic's lax mode coerces (0.0 -> false,
    # "7" -> 7). Counted and shown, not failed: the gateway accepts what pydantic can read without loss.
    coerced: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]]:
    """The app, its lifespan run, on one event loop that every case is sent on in turn."""
    loop = asyncio.new_event_loop()
    context = serve(FakeTriton(), *ROUTES)
    client = loop.run_until_complete(context.__aenter__())
    try:
        yield loop, client
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


def envelope_problem(response: httpx.Response) -> str | None:
    """Why an error response is not the one envelope; None when it is."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {response.headers.get('content-type')!r}"
    try:
        ErrorEnvelope.model_validate(json.loads(response.content))
    except (ValueError, ValidationError) as error:
        return f"not the envelope: {error}"
    return None


def stream_problem(path: str, response: httpx.Response) -> str | None:
    """Why a text/event-stream answer is not chunks (or one envelope) then ``[DONE]``; None when it is."""
    data = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return "the stream does not end with data: [DONE]"
    for event in data[:-1]:
        try:
            CHUNK_OF_PATH[path].model_validate_json(event)
        except ValidationError:
            try:
                ErrorEnvelope.model_validate_json(event)
            except ValidationError as error:
                return f"event {event[:200]!r} is neither a chunk nor the envelope: {error}"
    return None


def send(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient, case: Any) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    body = {"json": kwargs["json"]} if "json" in kwargs else {"content": kwargs.get("data")}
    return loop.run_until_complete(client.request(
        kwargs["method"], kwargs["url"], headers=kwargs["headers"], params=kwargs["params"], **body))


def fuzz(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient, operation: Any, mode: GenerationMode,
         run: FuzzRun) -> None:
    service = SERVICE_OF_PATH.get(operation.path)

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), aimed=st.booleans())
    def one_case(case: Any, aimed: bool) -> None:
        if service and aimed and isinstance(case.body, dict):
            case.body["model"] = service
        response = send(loop, client, case)
        run.cases += 1
        run.statuses[response.status_code] = run.statuses.get(response.status_code, 0) + 1
        problems = []
        if response.status_code >= 500 and response.status_code not in DESIGNED_5XX:
            problems.append(f"status {response.status_code}")
        if response.status_code >= 400 and (problem := envelope_problem(response)):
            problems.append(problem)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        if streamed and (problem := stream_problem(operation.path, response)):
            problems.append(problem)
        checks = (STREAM_CHECKS if streamed else SCHEMA_CHECKS) + (
            [negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
        try:
            case.validate_response(response, checks=checks, excluded_checks=[not_a_server_error])
        except FailureGroup as group:
            accepted = [e for e in group.exceptions if isinstance(e, AcceptedNegativeData)]
            if accepted:
                run.coerced.append(f"{operation.label} {case.body!r:.200}")
            problems += [" ".join(str(e).split())[:1500] for e in group.exceptions if e not in accepted]
        if problems:
            sent = case.body if isinstance(case.body, dict | list | str | bytes) else None
            run.failures.append(f"{mode.value} {operation.label} body={sent!r:.300}: {response.status_code} "
                                f"{response.text[:300]!r}: {'; '.join(problems)}")

    try:
        one_case()
    except Unsatisfiable:
        # Nothing to break in an operation with no body and no parameters (GET /health): no negative case exists.
        if mode is GenerationMode.POSITIVE:
            raise


def test_generated_requests_get_designed_answers_when_fuzzed(
    gateway: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient],
) -> None:
    loop, client = gateway
    schema = schemathesis.openapi.from_dict(openapi_document())
    operations = [result.ok() for result in schema.get_all_operations()]
    run = FuzzRun()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(loop, client, operation, mode, run)
    print(f"{run.cases} cases over {len(operations)} operations; statuses {dict(sorted(run.statuses.items()))}; "
          f"{len(run.coerced)} negative cases accepted by coercion")
    for accepted in run.coerced:
        print("  coerced:", accepted)
    for failure in run.failures:
        print("  FAILED:", failure)
    assert run.failures == []
    assert run.cases >= MIN_CASES
    # Both sides reached: requests served (200) and refused for their content (422), not only 404s.
    assert {200, 404, 422} <= run.statuses.keys()
