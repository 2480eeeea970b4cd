"""Request bodies of every endpoint, as pydantic models (OpenAI, Cohere v2 and Jina shapes).

Unknown fields are refused, so a misspelt option is an error naming it rather than silently ignored. Every number
is bounded, so that none overflows the tensor it is sent in (a 422 naming the field rather than a 500). Responses
are plain dicts built by the endpoint modules (serialised with orjson, which writes numpy arrays directly).

OpenAI's clients fill in options this server does not implement (LangChain's OpenAI sends ``presence_penalty: 0``,
LlamaIndex ``tool_choice`` and so on): such a field is accepted at the value that changes nothing (``neutral_only``)
and refused at any other, naming the field, so that no option is silently ignored. ``null`` always means "not
given", as in OpenAI's own API.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runtimes import signatures

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]

# The largest values of the LLM's INT32 (max_tokens) and INT64 (seed) tensors (runtimes/signatures.py); the counts
# that are never sent to Triton (dimensions, top_n) take the INT32 bound too.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The request field each Triton input is filled from (embeddings.py, rerank.py, completions.py): a runtime's error
# names the tensor ("text_input: the prompt has 1206 tokens; ..."), the client is told the field.
REQUEST_FIELD_OF_TENSOR = {
    signatures.TEXT: "input",
    signatures.QUERY: "query",
    signatures.DOCUMENT: "documents",
    signatures.TEXT_INPUT: "prompt",
    signatures.MESSAGES: "messages",
    signatures.MAX_TOKENS: "max_tokens",
    signatures.TEMPERATURE: "temperature",
    signatures.TOP_P: "top_p",
    signatures.SEED: "seed",
    signatures.STOP: "stop",
}

# How to make LangChain's OpenAIEmbeddings send text: by default it sends tiktoken (cl100k) token ids, which mean
# nothing to this server's tokenizers.
LANGCHAIN_TEXT_HINT = "LangChain's OpenAIEmbeddings sends text with check_embedding_ctx_length=False"


def neutral_only(*neutral: object, reason: str = "") -> AfterValidator:
    """A field accepted only when absent, null or one of ``neutral`` (values that change nothing here); any other
    value is a 422 saying which value is supported ("only 0 is supported"), or "not supported" when none is."""
    allowed = " or ".join(json.dumps(value) for value in neutral)
    message = f"only {allowed} is supported" if neutral else "not supported"
    if reason:
        message += f" ({reason})"

    def check(value: Any) -> Any:
        if value is not None and value not in neutral:
            raise PydanticCustomError("unsupported_value", message)
        return value

    return AfterValidator(check)


def _refuse_token_ids(hint: str) -> Callable[[Any], Any]:
    """A list item that is a token id or an array of them (OpenAI's ``Iterable[int]`` inputs): a 422 naming it."""
    suffix = f"; {hint}" if hint else ""

    def check(value: Any) -> Any:
        if isinstance(value, list) or (isinstance(value, int) and not isinstance(value, bool)):
            raise PydanticCustomError("token_ids", f"token arrays are not accepted, only text{suffix}")
        return value

    return check


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's clients send null for an option left unset (LangChain's OpenAI: "seed": null); a field with a
        # default takes it, rather than failing its type.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required() or fields[key].default is None
        }


TextItem = Annotated[NonEmptyText, BeforeValidator(_refuse_token_ids(LANGCHAIN_TEXT_HINT))]


class EmbeddingRequest(_Body):
    model: NonEmptyText
    input: NonEmptyText | Annotated[list[TextItem], Field(min_length=1)] = Field(
        description="A text or a list of texts (token arrays are not accepted)."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, gt=0, le=INT32_MAX, description="Must equal the model's own dimension when given."
    )
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class TextDocument(_Body):
    text: str


class RerankRequest(_Body):
    """Cohere v2 (`documents` as strings) and Jina (`documents` as strings or `{text}`) in one shape."""

    model: NonEmptyText
    query: NonEmptyText
    documents: Annotated[list[str | TextDocument], Field(min_length=1)]
    top_n: int | None = Field(None, gt=0, le=INT32_MAX)
    return_documents: bool = False

    def document_texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


class StreamOptions(_Body):
    include_usage: bool = False
    # OpenAI pads stream chunks with random characters (a side channel defence); the padding carries no content,
    # and this server adds none either way.
    include_obfuscation: bool | None = None


NoPenalty = Annotated[float | None, neutral_only(0, reason="no sampling penalties")]


class _Sampling(_Body):
    model: NonEmptyText
    max_tokens: int | None = Field(None, gt=0, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at the value that changes nothing (neutral_only):
    n: Annotated[int | None, neutral_only(1, reason="one choice per prompt")] = None
    frequency_penalty: NoPenalty = None
    presence_penalty: NoPenalty = None
    logit_bias: Annotated[dict[str, float] | None, neutral_only({})] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


PromptItem = Annotated[NonEmptyText, BeforeValidator(_refuse_token_ids(""))]


class CompletionRequest(_Sampling):
    prompt: NonEmptyText | Annotated[list[PromptItem], Field(min_length=1)]
    best_of: Annotated[int | None, neutral_only(1)] = None
    echo: Annotated[bool | None, neutral_only(False)] = None
    logprobs: Annotated[int | None, neutral_only()] = None
    suffix: Annotated[str | None, neutral_only("")] = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    # What an assistant message returned by OpenAI carries when sent back as history, empty.
    refusal: Annotated[str | None, neutral_only()] = None
    tool_calls: Annotated[list[Any] | None, neutral_only([])] = None
    function_call: Annotated[dict[str, Any] | None, neutral_only()] = None
    audio: Annotated[dict[str, Any] | None, neutral_only()] = None
    annotations: Annotated[list[Any] | None, neutral_only([])] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


NO_TOOLS = "no tool calling"


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, gt=0, le=INT32_MAX)
    # Accepted only at the value that changes nothing (neutral_only); with no tools, every tool option is moot.
    logprobs: Annotated[bool | None, neutral_only(False)] = None
    top_logprobs: Annotated[int | None, neutral_only(0)] = None
    tools: Annotated[list[Any] | None, neutral_only([], reason=NO_TOOLS)] = None
    tool_choice: Annotated[str | dict[str, Any] | None, neutral_only("none", "auto", reason=NO_TOOLS)] = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[Any] | None, neutral_only([], reason=NO_TOOLS)] = None
    function_call: Annotated[str | dict[str, Any] | None, neutral_only("none", "auto", reason=NO_TOOLS)] = None
    response_format: Annotated[dict[str, Any] | None, neutral_only({"type": "text"})] = None
    modalities: Annotated[list[str] | None, neutral_only(["text"])] = None
    audio: Annotated[dict[str, Any] | None, neutral_only()] = None
    prediction: Annotated[dict[str, Any] | None, neutral_only()] = None
    web_search_options: Annotated[dict[str, Any] | None, neutral_only()] = None
    moderation: Annotated[dict[str, Any] | None, neutral_only()] = None
    reasoning_effort: Annotated[str | None, neutral_only("none")] = None
    verbosity: Annotated[str | None, neutral_only("medium")] = None
    store: Annotated[bool | None, neutral_only(False, reason="completions are not stored")] = None
    service_tier: Annotated[str | None, neutral_only("auto", "default")] = None
    # Labels and caching hints: they never change the output, so any value is accepted (and ignored).
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _last_not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(message.text() for message in messages):
            raise ValueError("every message is empty")
        return messages

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
