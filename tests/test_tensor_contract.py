"""The gateway side of the tensor contract (runtimes/signatures.py): every tensor the gateway sends or reads is one
that SIGNATURES lists for the service's type, of its type and shape. Against a fake Triton that answers exactly the
contract's outputs, so reading any other output fails the request."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import numpy.typing as npt
import pytest

from runtimes import signatures
from runtimes.signatures import SIGNATURES, Tensor
from tests.gateway_fakes import DTYPES, FakeTriton, route, serve


def assert_within_contract(service_type: str, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
    contract = {tensor.name: tensor for tensor in SIGNATURES[service_type][0]}
    assert set(inputs) <= set(contract), f"not {service_type} inputs: {set(inputs) - set(contract)}"
    assert {name for name, tensor in contract.items() if not tensor.optional} <= set(inputs)
    for name, array in inputs.items():
        tensor: Tensor = contract[name]
        assert array.dtype == DTYPES[tensor.data_type], name
        assert array.ndim == 1 + len(tensor.dims), name
        assert all(dim in (-1, size) for dim, size in zip(tensor.dims, array.shape[1:], strict=True)), name


def post_all(triton: FakeTriton, service_route: Any, *requests: tuple[str, dict[str, Any]]) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        async with serve(triton, service_route) as client:
            return [await client.post(path, json=body) for path, body in requests]

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    ("service_type", "path", "body"),
    [
        ("embedding", "/v1/embeddings", {"model": "svc", "input": ["one", "two"]}),
        ("reranker", "/v1/rerank", {"model": "svc", "query": "q", "documents": ["one", "two"]}),
    ],
)
def test_gateway_sends_and_reads_only_contract_tensors_when_encoding(
    service_type: str, path: str, body: dict[str, Any]
) -> None:
    triton = FakeTriton()
    (response,) = post_all(triton, route("svc", service_type), (path, body))
    assert response.status_code == 200, response.text
    ((inputs, outputs),) = triton.inferred
    assert_within_contract(service_type, inputs)
    assert set(outputs) <= {tensor.name for tensor in SIGNATURES[service_type][1]}


def test_gateway_sends_and_reads_only_contract_tensors_when_generating() -> None:
    triton = FakeTriton(pieces=["Hel", "lo"])
    sampling = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n", "."]}
    chat = {"model": "svc", "messages": [{"role": "user", "content": "hi"}]}
    responses = post_all(
        triton, route("svc", "llm"),
        ("/v1/completions", {"model": "svc", "prompt": "hi", **sampling}),
        ("/v1/completions", {"model": "svc", "prompt": "hi", "stream": True}),
        ("/v1/chat/completions", {**chat, **sampling, "max_completion_tokens": 4}),
        ("/v1/chat/completions", {**chat, "stream": True}),
    )
    for response in responses:
        assert response.status_code == 200, response.text
        assert "Hel" in response.text and "error" not in response.text
    assert len(triton.streamed) == 4
    for inputs in triton.streamed:
        assert_within_contract("llm", inputs)
        assert len({"text_input", "messages"} & set(inputs)) == 1
    assert set(triton.streamed[0]) == {tensor.name for tensor in SIGNATURES["llm"][0]} - {"messages"}


def test_signature_name_constants_name_contract_tensors_when_defined() -> None:
    every_name = {tensor.name for inputs, outputs in SIGNATURES.values() for tensor in (*inputs, *outputs)}
    constants = {key: value for key, value in vars(signatures).items()
                 if key.isupper() and isinstance(value, str) and not key.endswith(("_PARAMETER", "_MESSAGE"))}
    assert constants and set(constants.values()) <= every_name
    assert signatures.output_names("reranker") == ("score", "tokens", "truncated")
