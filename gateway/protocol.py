"""Request bodies of every endpoint, as pydantic models (OpenAI, Cohere v2 and Jina shapes).

Unknown fields are refused, so a misspelt option is an error naming it rather than silently ignored. Every number
is bounded, so that none overflows the tensor it is sent in (a 422 naming the field rather than a 500). Responses
are plain dicts built by the endpoint modules (serialised with orjson, which writes numpy arrays directly).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]

# The largest values of the LLM's INT32 (max_tokens) and INT64 (seed) tensors (runtimes/signatures.py); the counts
# that are never sent to Triton (dimensions, top_n) take the INT32 bound too.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(_Body):
    model: NonEmptyText
    input: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] = Field(
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


class _Sampling(_Body):
    model: NonEmptyText
    max_tokens: int | None = Field(None, gt=0, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, gt=0, le=INT32_MAX)

    @field_validator("messages")
    @classmethod
    def _last_not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(message.text() for message in messages):
            raise ValueError("every message is empty")
        return messages

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
