"""Response bodies of every endpoint, as pydantic models: what ``/openapi.json`` describes (gateway/openapi.py).

The endpoints build plain dicts and serialise them with orjson, which writes numpy arrays directly: going through
these models cost 2-9 times the CPU per response (figures in tests/test_openapi.py's docstring). That test
validates what every endpoint really returns against the document made from these models, so the dicts and the
document cannot drift apart. ``/info``, rarely asked, is built from its model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .settings import GatewaySettings

FinishReason = Literal["stop", "length", "cancelled"]


class _Response(BaseModel):
    # Strict about extra keys: a field an endpoint adds without describing it fails tests/test_openapi.py.
    model_config = ConfigDict(extra="forbid")


# Embeddings (OpenAI shape, plus `truncated` and `cache`)


class Embedding(_Response):
    object: Literal["embedding"]
    index: int = Field(description="The position of the text in the request's `input`.")
    embedding: list[float] | str = Field(
        description="The vector: a list of floats, or with `encoding_format: base64` the little-endian float32 "
        "bytes in base64."
    )


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class CacheReport(_Response):
    """How many of the request's items the gateway's cache answered (also in `x-sluice-cache-hits`/`-misses`)."""

    hits: int
    misses: int


class EmbeddingResponse(_Response):
    object: Literal["list"]
    data: list[Embedding]
    model: str = Field(description="The service that answered.")
    usage: EmbeddingUsage
    truncated: list[int] = Field(description="Indices of the texts cut at the model's `max_length` tokens.")
    cache: CacheReport


# Rerank (Cohere v2 and Jina shapes)


class RerankDocument(_Response):
    text: str


class RerankResult(_Response):
    index: int = Field(description="The position of the document in the request's `documents`.")
    relevance_score: float
    document: RerankDocument | None = Field(None, description="Present with `return_documents: true`.")


class RerankUsage(_Response):
    total_tokens: int


class BilledUnits(_Response):
    search_units: int


class RerankMeta(_Response):
    billed_units: BilledUnits
    truncated: list[int] = Field(description="Indices of the documents whose pair was cut at `max_length` tokens.")


class RerankResponse(_Response):
    id: str
    model: str = Field(description="The service that answered.")
    results: list[RerankResult] = Field(description="Most relevant first, at most `top_n`.")
    usage: RerankUsage
    meta: RerankMeta
    cache: CacheReport


# Completions and chat completions (OpenAI shapes)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None = Field(description="null until the last chunk of text.")
    logprobs: None


class CompletionChunk(_Response):
    """One server-sent event's data when `stream: true`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: Usage | None = Field(None, description="Only in the last chunk, with `stream_options.include_usage`.")


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = Field(None, description="Only in the first chunk.")
    content: str | None = Field(None, description="Absent from the last chunk when it carries no text.")


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = Field(description="null until the last chunk of text.")
    logprobs: None


class ChatCompletionChunk(_Response):
    """One server-sent event's data when `stream: true`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: Usage | None = Field(None, description="Only in the last chunk, with `stream_options.include_usage`.")


# Models, health, readiness, info


class ModelCard(_Response):
    id: str = Field(description="The service's name: what a request's `model` names.")
    object: Literal["model"]
    created: int
    owned_by: str
    type: Literal["embedding", "reranker", "llm"]
    model: str = Field(description="The config's model key; a request may name it when one service serves it.")


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    status: Literal["alive"]


class Ready(_Response):
    status: Literal["ready"]
    services: list[str]


class ServiceLimits(_Response):
    """What the gateway and Triton enforce for a service (config.yaml's `runtime:`; seconds, requests/s)."""

    batch_size: int
    batch_timeout: float
    max_queue_size: int
    worker_count: int
    rate_limit: float
    total_timeout: float
    queue_timeout: float
    inference_timeout: float
    enable_cache: bool
    max_length: int = Field(description="Tokens per text (embedding, reranker) or the context window (llm).")


class ServiceInfo(_Response):
    service: str
    type: Literal["embedding", "reranker", "llm"]
    model: str
    fingerprint: str = Field(description="Digest of the model's content, as exported (part of the cache keys).")
    limits: ServiceLimits


class GatewayInfo(_Response):
    """The gateway's options that change what clients see; never a secret (no Redis URL, no key digests)."""

    max_items: int = Field(description="Texts, documents or prompts per request.")
    max_request_bytes: int
    api_keys: bool = Field(description="Whether requests need `Authorization: Bearer <key>`.")
    key_rate_limit: float | None = Field(description="Requests per second per API key, when limited.")
    redis: bool = Field(description="Whether rate limits and the cache live in Redis (shared by replicas).")
    cache_max_items: int = Field(description="Items the in-memory cache keeps (without Redis).")


class Info(_Response):
    version: str
    services: list[ServiceInfo]
    gateway: GatewayInfo

    @classmethod
    def of(cls, settings: GatewaySettings, version: str) -> Info:
        services = [
            ServiceInfo(
                service=route.service,
                type=route.type,
                model=route.model,
                fingerprint=route.fingerprint,
                limits=ServiceLimits(
                    batch_size=route.batch_size,
                    batch_timeout=route.batch_timeout,
                    max_queue_size=route.max_queue_size,
                    worker_count=route.instances,
                    rate_limit=route.rate_limit,
                    total_timeout=route.total_timeout,
                    queue_timeout=route.queue_timeout,
                    inference_timeout=route.inference_timeout,
                    enable_cache=route.enable_cache,
                    max_length=route.max_length,
                ),
            )
            for route in sorted(settings.routes.values(), key=lambda r: r.service)
        ]
        gateway = GatewayInfo(
            max_items=settings.max_items,
            max_request_bytes=settings.max_request_bytes,
            api_keys=bool(settings.key_digests),
            key_rate_limit=settings.key_rate_limit,
            redis=settings.redis_url is not None,
            cache_max_items=settings.cache_max_items,
        )
        return cls(version=version, services=services, gateway=gateway)
