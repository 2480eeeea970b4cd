"""Request bodies refused by ``parse_body`` (gateway/admission.py, models in gateway/protocol.py): the status and
the field each refusal names. No server: a Starlette request over a canned body."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import Message

from gateway.admission import parse_body
from gateway.errors import GatewayError
from gateway.protocol import ChatRequest, CompletionRequest, EmbeddingRequest, RerankRequest

INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
EMBED = {"model": "m", "input": "x"}
RERANK = {"model": "m", "query": "q", "documents": ["d"]}
COMPLETE = {"model": "m", "prompt": "hi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parsed(model: type[BaseModel], body: bytes | dict[str, Any]) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive() -> Message:
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    return asyncio.run(parse_body(request, model))


def refusal(model: type[BaseModel], body: bytes | dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as refused:
        parsed(model, body)
    return refused.value


BODIES: dict[type[BaseModel], dict[str, Any]] = {
    EmbeddingRequest: EMBED, RerankRequest: RERANK, CompletionRequest: COMPLETE, ChatRequest: CHAT,
}
OUT_OF_RANGE = [
    (EmbeddingRequest, "dimensions", 0),
    (EmbeddingRequest, "dimensions", INT32_MAX + 1),
    (RerankRequest, "top_n", 0),
    (RerankRequest, "top_n", INT32_MAX + 1),
    (CompletionRequest, "max_tokens", 0),
    (CompletionRequest, "max_tokens", INT32_MAX + 1),
    (CompletionRequest, "max_tokens", 1e10),  # a whole float: a count to pydantic, an overflow to int32
    (CompletionRequest, "max_tokens", 1e30),
    (CompletionRequest, "temperature", -0.1),
    (CompletionRequest, "temperature", 2.5),
    (CompletionRequest, "top_p", 0),
    (CompletionRequest, "top_p", 1.5),
    (CompletionRequest, "seed", INT64_MAX + 1),
    (CompletionRequest, "seed", -INT64_MAX - 2),
    (CompletionRequest, "seed", 1e30),
    (ChatRequest, "max_tokens", INT32_MAX + 1),
    (ChatRequest, "max_completion_tokens", 0),
    (ChatRequest, "max_completion_tokens", INT32_MAX + 1),
    (ChatRequest, "seed", INT64_MAX + 1),
    (ChatRequest, "temperature", 3),
    (ChatRequest, "top_p", 2),
]


@pytest.mark.parametrize(("model", "field", "value"), OUT_OF_RANGE,
                         ids=[f"{model.__name__}.{field}={value}" for model, field, value in OUT_OF_RANGE])
def test_parse_body_refuses_with_422_naming_the_field_when_a_number_is_out_of_range(
    model: type[BaseModel], field: str, value: float
) -> None:
    error = refusal(model, BODIES[model] | {field: value})
    assert (error.status, error.param) == (422, field)
    assert error.message.startswith(f"{field}: ")


def test_parse_body_accepts_numbers_at_their_bounds_when_they_fit_their_tensors() -> None:
    low = parsed(CompletionRequest, COMPLETE | {"max_tokens": 1, "seed": -INT64_MAX - 1, "temperature": 0,
                                                "top_p": 1e-9})
    high = parsed(ChatRequest, CHAT | {"max_tokens": INT32_MAX, "max_completion_tokens": INT32_MAX,
                                       "seed": INT64_MAX, "temperature": 2, "top_p": 1})
    assert (low.max_tokens, low.seed) == (1, -INT64_MAX - 1)
    assert (high.token_limit(), high.seed) == (INT32_MAX, INT64_MAX)
    assert parsed(CompletionRequest, COMPLETE | {"max_tokens": 16.0}).max_tokens == 16  # a whole float is a count
    assert parsed(EmbeddingRequest, EMBED | {"dimensions": INT32_MAX}).dimensions == INT32_MAX
    assert parsed(RerankRequest, RERANK | {"top_n": INT32_MAX}).top_n == INT32_MAX


def test_parse_body_refuses_with_400_naming_no_field_when_the_body_is_not_json() -> None:
    error = refusal(EmbeddingRequest, b"{not json")
    assert (error.status, error.param) == (400, None)
    assert error.message.startswith("the body is not valid JSON")


def test_parse_body_names_an_unknown_field_when_one_is_sent() -> None:
    error = refusal(EmbeddingRequest, EMBED | {"colour": "red"})
    assert (error.status, error.param, error.message) == (422, "colour", "colour: unknown field")


def test_parse_body_names_the_deepest_place_when_every_branch_of_a_union_has_the_wrong_type() -> None:
    error = refusal(EmbeddingRequest, {"model": "m", "input": [1, 2]})
    assert error.param == "input.0"


def test_parse_body_prefers_a_broken_constraint_to_a_wrong_type_when_a_union_reports_both() -> None:
    error = refusal(EmbeddingRequest, {"model": "m", "input": ""})
    assert error.param == "input" and "at least 1 character" in error.message


def test_parse_body_counts_the_other_fields_at_fault_when_several_are() -> None:
    error = refusal(CompletionRequest, {"model": "m", "prompt": "hi", "max_tokens": 0, "top_p": 5, "seed": 0.5})
    assert error.param == "max_tokens" and error.message.endswith("(and 2 more fields)")
    single = refusal(CompletionRequest, {"model": "m", "prompt": "hi", "max_tokens": 0, "top_p": 5})
    assert single.message.endswith("(and 1 more field)")
