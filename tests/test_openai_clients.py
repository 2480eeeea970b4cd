"""The OpenAI surface as clients send it: the official ``openai`` client, and the request bodies LangChain and
LlamaIndex send with their default fields, against the real gateway and a real tritonserver over the demo models.

The bodies are written out as the libraries put them on the wire (after the ``openai`` client they call has added
its own defaults, such as ``encoding_format: "base64"``), so that no test needs those libraries installed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.chat.chat_completion_stream_options_param import ChatCompletionStreamOptionsParam
from pydantic import BaseModel

from gateway.protocol import ChatRequest, CompletionRequest, EmbeddingRequest, StreamOptions
from gateway.settings import GatewaySettings
from tests.gateway_server import GatewayServer
from tests.helpers import compiled_triton, config_with, demo_config

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "hi"}]
# Longer than the LLM's context below (max_length 64): the tiny Llama's tokenizer makes one token of each word.
TOO_LONG = "once upon a time " * 40


def clients_config(models: dict[str, Path]) -> dict[str, Any]:
    """The demo config without its reranker (no test here uses one), with a short context and short default
    generations (LangChain and LlamaIndex send no max_tokens), and limits no test reaches."""
    fast = {"rate_limit": 1000.0, "queue_timeout": 1.0, "inference_timeout": 10.0, "total_timeout": 12.0}
    return config_with(
        {
            "models.reranker_v1": ...,
            "services.reranker_service": ...,
            "models.llm_v1.max_length": 64,
            "models.llm_v1.max_tokens": 8,
            "services.llm_service.runtime": fast,
            "services.embedding_service.runtime": {**fast, "worker_count": 1},
        },
        demo_config(models),
    )


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("openai-clients")
    with compiled_triton(root, clients_config(demo_models), export_cache) as (triton, repository):
        settings = GatewaySettings.from_repository(repository, triton_grpc=triton.grpc_url, environ={})
        with GatewayServer(settings) as server:
            yield server.url


@pytest.fixture(scope="module")
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def ai(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def events(response: httpx.Response) -> list[Any]:
    """A server-sent event stream's data, parsed; the last is ``[DONE]``."""
    data = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", response.text
    return [json.loads(item) for item in data[:-1]]


# ---- every field the official client knows ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "model"),
    [
        (chat_create_params.CompletionCreateParamsStreaming, ChatRequest),
        (completion_create_params.CompletionCreateParamsStreaming, CompletionRequest),
        (embedding_create_params.EmbeddingCreateParams, EmbeddingRequest),
        (ChatCompletionStreamOptionsParam, StreamOptions),
    ],
    ids=["chat", "completions", "embeddings", "stream_options"],
)
def test_protocol_knows_every_field_when_the_installed_openai_client_can_send_it(
    params: Any, model: type[BaseModel]
) -> None:
    # A field the client gains in a later release must be decided on (supported, or accepted only at its neutral
    # value), not answered "unknown field".
    sent = set(params.__required_keys__) | set(params.__optional_keys__)
    assert sent - set(model.model_fields) == set()


# ---- the official openai client -----------------------------------------------------------------------------------


def test_openai_client_embeddings_decode_as_unit_vectors_when_sent_with_its_defaults_and_options(
    ai: openai.OpenAI,
) -> None:
    by_default = ai.embeddings.create(model="embedding_service", input=["hello", "world"])  # base64 on the wire
    assert len(by_default.data) == 2 and len(by_default.data[0].embedding) == 384
    as_floats = ai.embeddings.create(model="embedding_service", input="hello", encoding_format="float",
                                     dimensions=384, user="someone")
    assert np.allclose(as_floats.data[0].embedding, by_default.data[0].embedding, atol=1e-6)
    assert abs(np.linalg.norm(as_floats.data[0].embedding) - 1) < 1e-4


def test_openai_client_completion_is_generated_when_neutral_options_are_given(ai: openai.OpenAI) -> None:
    completion = ai.completions.create(
        model="llm_service", prompt="Once upon", max_tokens=4, temperature=0, seed=7, user="someone",
        presence_penalty=0, frequency_penalty=0, logit_bias={}, n=1, best_of=1, echo=False, suffix=None,
        logprobs=None,
    )
    assert completion.choices[0].finish_reason == "length" and completion.usage is not None
    assert completion.usage.completion_tokens == 4


def test_openai_client_chat_streams_and_answers_whole_the_same_text_when_neutral_options_are_given(
    ai: openai.OpenAI,
) -> None:
    neutral: dict[str, Any] = {
        "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "n": 1, "logprobs": False,
        "top_logprobs": 0, "tools": [], "tool_choice": "none", "parallel_tool_calls": False, "store": False,
        "metadata": {"team": "search"}, "response_format": {"type": "text"}, "modalities": ["text"],
        "service_tier": "auto", "user": "someone", "seed": 7,
    }
    stream = ai.chat.completions.create(
        model="llm_service", messages=CHAT, max_completion_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}, **neutral,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    whole = ai.chat.completions.create(model="llm_service", messages=CHAT, max_completion_tokens=6, temperature=0,
                                       **neutral)
    assert whole.choices[0].message.content == text


def test_openai_client_retrieves_a_model_as_listed_and_gets_404_when_the_id_is_unknown(
    ai: openai.OpenAI, client: httpx.Client
) -> None:
    model = ai.models.retrieve("llm_service")
    listed = {entry["id"]: entry for entry in client.get("/v1/models").json()["data"]}
    assert model.id == "llm_service" and model.object == "model" and model.owned_by == "sluice"
    assert client.get("/v1/models/llm_service").json() == listed["llm_service"]
    assert client.get("/v1/models/llm_v1").json()["id"] == "llm_service"  # a model key names its service
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("gpt-9")
    missing = client.get("/v1/models/gpt-9")
    assert missing.status_code == 404
    error = error_of(missing)
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"] and "llm_service" in error["message"]


# ---- bodies as LangChain and LlamaIndex send them -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        # langchain-openai 1.7.4, OpenAIEmbeddings(model=..., base_url=..., check_embedding_ctx_length=False)
        {"input": ["hello world", "good night"], "model": "embedding_service", "encoding_format": "base64"},
        # llama-index-embeddings-openai 0.7.0, OpenAIEmbedding(model_name=..., api_base=...)
        {"input": ["hello world"], "model": "embedding_service", "encoding_format": "base64"},
    ],
    ids=["langchain", "llamaindex"],
)
def test_library_embedding_bodies_get_base64_vectors_when_sent_with_their_defaults(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    vectors = [np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in response.json()["data"]]
    assert len(vectors) == len(body["input"]) and all(v.shape == (384,) for v in vectors)


def test_langchain_default_embedding_body_is_refused_naming_the_option_when_it_sends_token_arrays(
    client: httpx.Client,
) -> None:
    # langchain-openai 1.7.4, OpenAIEmbeddings(model=..., base_url=...): check_embedding_ctx_length=True by default
    # sends each text as tiktoken (cl100k_base) token ids, which mean nothing to this server's tokenizers.
    body = {"input": [[15339, 1917], [19045, 3814]], "model": "embedding_service", "encoding_format": "base64"}
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert error["param"] == "input.0" and "token arrays" in error["message"]
    assert "check_embedding_ctx_length=False" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        # langchain-openai 1.7.4, OpenAI(model=..., base_url=...).invoke(prompt): its default fields, the seed and
        # logprobs as nulls, the prompt as a batch
        {"model": "llm_service", "temperature": 0.7, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0,
         "n": 1, "seed": None, "logprobs": None, "max_tokens": 256, "prompt": ["Once upon a time"]},
        # llama-index-llms-openai-like 0.8.x (llama-index-llms-openai 0.8.3), OpenAILike(..., is_chat_model=False)
        # .complete(prompt)
        {"prompt": "Once upon a time", "model": "llm_service", "temperature": 0.1, "stream": False},
    ],
    ids=["langchain", "llamaindex"],
)
def test_library_completion_bodies_are_completed_when_sent_with_their_defaults(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["choices"][0]["text"] and completion["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    "body",
    [
        # langchain-openai 1.7.4, OpenAI(model=..., base_url=...).stream(prompt)
        {"model": "llm_service", "temperature": 0.7, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0,
         "n": 1, "seed": None, "logprobs": None, "max_tokens": 256, "stream": True, "prompt": "Once upon a time"},
        # llama-index-llms-openai 0.8.3, OpenAILike(..., is_chat_model=False).stream_complete(prompt)
        {"prompt": "Once upon a time", "model": "llm_service", "temperature": 0.1, "stream": True},
    ],
    ids=["langchain", "llamaindex"],
)
def test_library_completion_stream_bodies_stream_to_a_finish_when_sent_with_their_defaults(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    chunks = events(response)
    assert all("error" not in chunk for chunk in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    "body",
    [
        # langchain-openai 1.7.4, ChatOpenAI(model=..., base_url=...).invoke(messages): temperature, n and the
        # rest left unset are not sent
        {"model": "llm_service", "stream": False, "messages": [{"content": "hi", "role": "user"}]},
        # langchain-openai 1.7.4, ChatOpenAI(..., temperature=0, max_tokens=5, stop=["\n"]): set options
        {"model": "llm_service", "stream": False, "temperature": 0, "stop": ["\n"], "max_completion_tokens": 5,
         "messages": [{"content": "be brief", "role": "system"}, {"content": "hi", "role": "user", "name": "ann"}]},
        # llama-index-llms-openai 0.8.3, OpenAILike(..., is_chat_model=True).chat(messages)
        {"messages": [{"role": "user", "content": "hi"}], "model": "llm_service", "temperature": 0.1,
         "stream": False},
    ],
    ids=["langchain", "langchain-options", "llamaindex"],
)
def test_library_chat_bodies_are_answered_when_sent_with_their_defaults(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    "body",
    [
        # langchain-openai 1.7.4, ChatOpenAI(model=..., base_url=..., stream_usage=True).stream(messages)
        {"model": "llm_service", "stream": True, "stream_options": {"include_usage": True},
         "messages": [{"content": "hi", "role": "user"}]},
        # llama-index-llms-openai 0.8.3, OpenAILike(..., is_chat_model=True).stream_chat(messages)
        {"messages": [{"role": "user", "content": "hi"}], "model": "llm_service", "temperature": 0.1,
         "stream": True},
    ],
    ids=["langchain", "llamaindex"],
)
def test_library_chat_stream_bodies_stream_to_a_finish_when_sent_with_their_defaults(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    chunks = events(response)
    assert all("error" not in chunk for chunk in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1
    if body.get("stream_options"):
        assert chunks[-1]["usage"]["completion_tokens"] > 0


# ---- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value", "says"),
    [
        ("/v1/chat/completions", "presence_penalty", 0.5, "only 0 is supported"),
        ("/v1/completions", "frequency_penalty", 1.0, "only 0 is supported"),
        ("/v1/chat/completions", "logit_bias", {"50256": -100}, "only {} is supported"),
        ("/v1/chat/completions", "n", 2, "only 1 is supported"),
        ("/v1/chat/completions", "logprobs", True, "only false is supported"),
        ("/v1/completions", "logprobs", 1, "not supported"),
        ("/v1/completions", "echo", True, "only false is supported"),
        ("/v1/completions", "best_of", 3, "only 1 is supported"),
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}], "no tool calling"),
        ("/v1/chat/completions", "tool_choice", "required", 'only "none" or "auto" is supported'),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}, 'only {"type": "text"} is supported'),
        ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}, "not supported"),
        ("/v1/chat/completions", "presence_penalties", 0, "unknown field"),  # misspelt: never accepted
    ],
)
def test_a_value_that_would_change_the_output_is_refused_naming_the_field_when_sent(
    client: httpx.Client, path: str, field: str, value: Any, says: str
) -> None:
    prompt = {"messages": CHAT} if path == "/v1/chat/completions" else {"prompt": "hi"}
    response = client.post(path, json={"model": "llm_service", **prompt, field: value})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == field and error["message"].startswith(f"{field}: ") and says in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("path", "field", "prompt"),
    [("/v1/completions", "prompt", {"prompt": TOO_LONG}),
     ("/v1/chat/completions", "messages", {"messages": [{"role": "user", "content": TOO_LONG}]})],
    ids=["completions", "chat"],
)
def test_a_prompt_longer_than_the_context_is_a_400_naming_it_when_sent(
    client: httpx.Client, path: str, field: str, prompt: dict[str, Any], stream: bool
) -> None:
    response = client.post(path, json={"model": "llm_service", "stream": stream, **prompt})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == field and error["code"] == "bad_request"
    assert error["message"].startswith(f"{field}: the prompt has ") and "max_length) is 64" in error["message"]


def test_openai_client_raises_bad_request_when_the_prompt_is_longer_than_the_context(ai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="max_length"):
        ai.completions.create(model="llm_service", prompt=TOO_LONG)
