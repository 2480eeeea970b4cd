"""Stage 2: the config language as pydantic models (``extra="forbid"``, strict types).

Runtime knobs are optional here: a service that leaves one out gets its model type's default
(compiler/defaults.py), filled in by the plan stage. Errors become ConfigIssues whose paths use the user's keys.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from sluice.errors import ConfigIssue

# Triton model names become URL path segments and directory names.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PerSecond = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
# cpu, gpu (every GPU), or gpu:0,1 (those GPUs).
Device = Annotated[str, StringConstraints(pattern=r"^(cpu|gpu|gpu:\d+(,\d+)*)$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _ModelBase(_Section):
    model_name: Annotated[str, StringConstraints(min_length=1)] = Field(
        description="A local directory (relative to the config file) or a Hugging Face id found offline."
    )
    device: Device = "cpu"


class EmbeddingModel(_ModelBase):
    type: Literal["embedding"]
    max_length: Count = Field(256, description="Tokens per text; longer texts are truncated and reported.")


class RerankerModel(_ModelBase):
    type: Literal["reranker"]
    max_length: Count = Field(512, description="Tokens per (query, document) pair.")


class LLMModel(_ModelBase):
    type: Literal["llm"]
    max_length: Count = Field(2048, description="Context window: prompt plus generated tokens.")
    max_tokens: Count = Field(256, description="Tokens generated when a request does not say.")


AnyModel = Annotated[EmbeddingModel | RerankerModel | LLMModel, Field(discriminator="type")]
MODEL_CLASSES: dict[str, type[_ModelBase]] = {
    "embedding": EmbeddingModel,
    "reranker": RerankerModel,
    "llm": LLMModel,
}


class Runtime(_Section):
    """The seed's nine knobs; None means "the model type's default"."""

    batch_size: Count | None = None
    batch_timeout: Seconds | None = None
    max_queue_size: Count | None = None
    worker_count: Count | None = None
    queue_timeout: Seconds | None = None
    inference_timeout: Seconds | None = None
    total_timeout: Seconds | None = None
    rate_limit: PerSecond | None = None
    enable_cache: bool | None = None


class Service(_Section):
    model: Name
    runtime: Runtime = Runtime()


class Server(_Section):
    """The tritonserver that `sluice serve` starts."""

    host: str = "127.0.0.1"
    http_port: Port = 8000
    grpc_port: Port = 8001
    metrics_port: Port = 8002
    response_cache_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024
    log_verbose: Annotated[int, Field(ge=0)] = 0


class Gateway(_Section):
    """The REST gateway in front of Triton."""

    host: str = "127.0.0.1"
    port: Port = 8080
    api_keys: list[Annotated[str, StringConstraints(min_length=16)]] = Field(default_factory=list)
    redis_url: str | None = None
    cache_max_items: Annotated[int, Field(ge=0)] = 100_000
    max_request_bytes: Count = 4 * 1024 * 1024
    max_items: Count = 2048
    key_rate_limit: PerSecond | None = Field(None, description="Requests per second per API key.")
    redis_failure: Literal["open", "closed"] = Field(
        "open",
        description="While redis_url cannot be reached: open (rate limits per replica in memory, cache bypassed) "
        "or closed (503 with Retry-After).",
    )


class Config(_Section):
    models: dict[Name, AnyModel]
    services: Annotated[dict[Name, Service], Field(min_length=1)]
    server: Server = Server()
    gateway: Gateway = Gateway()


def validate(data: Any) -> tuple[Config | None, list[ConfigIssue]]:
    """Validate raw data; return the config, or None and every issue found."""
    try:
        return Config.model_validate(data), []
    except ValidationError as exc:
        return None, [_issue(error, data) for error in exc.errors()]


def _issue(error: Any, data: Any) -> ConfigIssue:
    loc = list(error["loc"])
    # A discriminated union puts the tag in the location (models.m.embedding.max_length): drop it.
    if len(loc) >= 3 and loc[0] == "models" and loc[2] in MODEL_CLASSES:
        del loc[2]
    # A bad dict key is reported at the key itself (services.a/b), not at pydantic's "services.a/b.[key]".
    if loc and loc[-1] == "[key]":
        loc.pop()
    path = ".".join(str(part) for part in loc) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        return ConfigIssue(path, _unknown_key_message(loc, data))
    if kind == "missing":
        return ConfigIssue(path, "required but missing")
    if kind == "union_tag_not_found":
        return ConfigIssue(f"{path}.type", f"required but missing; expected one of {', '.join(MODEL_CLASSES)}")
    if kind == "union_tag_invalid":
        found = error["ctx"]["tag"]
        return ConfigIssue(f"{path}.type", f"expected one of {', '.join(MODEL_CLASSES)}, found {found!r}")
    message = str(error["msg"])
    if message.startswith("Input should be "):
        message = "expected " + message[len("Input should be ") :]
    elif message.startswith("String should match pattern "):
        message = "expected " + _PATTERN_WORDS.get(str(loc[-1]) if loc else "", _NAME_WORDS)
    return ConfigIssue(path, f"{message}, found {error['input']!r}")


_PATTERN_WORDS = {"device": "cpu, gpu or gpu:<ids> (e.g. gpu:0,1)"}
_NAME_WORDS = "a name of letters, digits, _ . - starting with a letter or digit"


def _unknown_key_message(loc: list[Any], data: Any) -> str:
    key = str(loc[-1])
    allowed = _section_fields(loc[:-1], data)
    if not allowed:
        return "unknown key"
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(allowed)}"
    return f"unknown key{hint}"


def _section_fields(loc: list[Any], data: Any) -> list[str]:
    """The keys allowed at a location, for 'did you mean' hints."""
    section: type[BaseModel] | None
    match loc:
        case []:
            section = Config
        case ["server"]:
            section = Server
        case ["gateway"]:
            section = Gateway
        case ["services", _]:
            section = Service
        case ["services", _, "runtime"]:
            section = Runtime
        case ["models", name]:
            try:
                model_type = data["models"][name]["type"]
            except (KeyError, TypeError):
                model_type = None
            section = MODEL_CLASSES.get(model_type) if isinstance(model_type, str) else None
        case _:
            section = None
    return list(section.model_fields) if section else []
