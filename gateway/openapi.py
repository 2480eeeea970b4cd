"""The gateway's API as an OpenAPI 3.1 document (``GET /openapi.json``), and Swagger UI to read it (``GET /docs``).

Every schema in the document comes from the pydantic models that validate requests (protocol.py) and describe
responses (responses.py, errors.py), through pydantic's own JSON Schema (2020-12, the dialect of OpenAPI 3.1), so the
document cannot say other than what the gateway checks. Swagger UI's files come from the ``swagger-ui-py`` package
and are served by the gateway itself: the page loads nothing from another host.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from sluice import __version__

from . import errors, responses
from .errors import ErrorEnvelope, GatewayError
from .protocol import ChatRequest, CompletionRequest, EmbeddingRequest, RerankRequest

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"

REQUEST_MODELS: tuple[type[BaseModel], ...] = (EmbeddingRequest, RerankRequest, CompletionRequest, ChatRequest)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    responses.EmbeddingResponse, responses.RerankResponse, responses.CompletionResponse, responses.CompletionChunk,
    responses.ChatCompletionResponse, responses.ChatCompletionChunk, responses.ModelList, responses.ModelCard,
    responses.Health, responses.Ready, responses.Info, ErrorEnvelope,
)

# Each error status, the class raising it and an example of its envelope, built by the class itself.
ERRORS: dict[int, GatewayError] = {
    400: errors.BadRequest("the body is not valid JSON: expected value at line 1 column 1"),
    401: errors.Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'."),
    404: errors.NotFound("model 'gpt-4' does not exist here; choose one of: embedding_service", param="model"),
    413: errors.PayloadTooLarge("input: 4096 items in one request; at most 2048", param="input"),
    422: errors.Unprocessable("input.0: String should have at least 1 character", param="input.0"),
    429: errors.RateLimited("embedding_service allows 100 requests per second; retry later"),
    500: errors.GatewayError("internal error; see the gateway log"),
    503: errors.Unavailable("embedding_service is overloaded: 500 requests wait for this service, at most 500 may; "
                            "retry later"),
    504: errors.DeadlineExceeded("embedding_service did not finish within its total_timeout budget of 0.5 s"),
}
ERROR_MEANINGS = {
    400: "The body is not valid JSON.",
    401: "A missing or wrong API key (only when the gateway has API keys).",
    404: "No such model (service), or no such path.",
    413: "The body exceeds max_request_bytes, or more items than max_items or than the rate limit can ever admit.",
    422: "A field is invalid; `param` names it.",
    429: "Over the service's rate_limit or the API key's key_rate_limit.",
    500: "An unexpected error; the gateway's log has the details.",
    503: "Refused for load (queue full, would miss queue_timeout or total_timeout), or Triton not reachable or ready.",
    504: "Past the service's total_timeout (or a Triton call past queue_timeout + inference_timeout).",
}
RETRY_AFTER = {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}
RATE_HEADERS = {
    "x-ratelimit-limit": {"schema": {"type": "integer"}, "description": "The service's budget per window."},
    "x-ratelimit-remaining": {"schema": {"type": "integer"}, "description": "What is left of it."},
    "x-ratelimit-reset": {"schema": {"type": "integer"}, "description": "Seconds until the window resets."},
}
CACHE_HEADERS = {
    "x-sluice-cache-hits": {"schema": {"type": "integer"}, "description": "Items answered by the cache."},
    "x-sluice-cache-misses": {"schema": {"type": "integer"}, "description": "Items sent to Triton."},
}
MODEL_CALL_ERRORS = (400, 401, 404, 413, 422, 429, 500, 503, 504)

# Swagger UI's files that /docs uses, served from the package's own copy, with their content types.
DOCS_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
DOCS_ASSET_PATHS = frozenset(f"/docs/static/{name}" for name in DOCS_ASSETS)
OPEN_PATHS = frozenset({"/openapi.json", "/docs"}) | DOCS_ASSET_PATHS  # no API key: a browser sends none


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_response(status: int) -> dict[str, Any]:
    example = ERRORS[status]
    response: dict[str, Any] = {
        "description": ERROR_MEANINGS[status],
        "content": {"application/json": {"schema": _ref(ErrorEnvelope), "example": example.body()}},
    }
    if status in (429, 503):
        response["headers"] = {"Retry-After": RETRY_AFTER} | (RATE_HEADERS if status == 429 else {})
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return response


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    ok: dict[str, Any],
    error_statuses: tuple[int, ...] = (500,),
    request: type[BaseModel] | None = None,
    open_path: bool = False,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if request is not None:
        operation["requestBody"] = {"required": True, "content": _json(_ref(request))}
    operation["responses"] = {"200": ok} | {
        str(status): {"$ref": f"#/components/responses/Error{status}"} for status in error_statuses
    }
    if open_path:
        operation["security"] = []  # never asks for a key, even when the gateway has keys
    return operation


def _streamable(whole: type[BaseModel], chunk: type[BaseModel], what: str) -> dict[str, Any]:
    return {
        "description": f"The {what}; with `stream: true`, server-sent events: each event's `data` is one "
        f"`{chunk.__name__}` as JSON, the stream ends with `data: [DONE]`, and an error after the first event is "
        "sent as one `ErrorEnvelope` event before `[DONE]` (an error before it is the response's status).",
        "headers": RATE_HEADERS,
        "content": {
            "application/json": {"schema": _ref(whole)},
            "text/event-stream": {"schema": {"oneOf": [_ref(chunk), _ref(ErrorEnvelope)]}},
        },
    }


def _paths() -> dict[str, Any]:
    embeddings = {"description": "One vector per text, in the request's order.", "headers": RATE_HEADERS |
                  CACHE_HEADERS, "content": _json(_ref(responses.EmbeddingResponse))}
    rerank_ok = {"description": "The documents' scores, most relevant first.", "headers": RATE_HEADERS |
                 CACHE_HEADERS, "content": _json(_ref(responses.RerankResponse))}

    def rerank(operation_id: str) -> dict[str, Any]:
        return _operation(operation_id, "Score documents against a query (Cohere v2 and Jina shapes)", "rerank",
                          rerank_ok, MODEL_CALL_ERRORS, RerankRequest)

    model_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "A service name, or a model key that one service serves."}
    return {
        "/v1/embeddings": {"post": _operation(
            "createEmbedding", "Embed texts (OpenAI shape)", "embeddings", embeddings, MODEL_CALL_ERRORS,
            EmbeddingRequest)},
        "/v1/rerank": {"post": rerank("rerank")},
        "/v2/rerank": {"post": rerank("rerankV2")},
        "/v1/completions": {"post": _operation(
            "createCompletion", "Complete prompts (OpenAI shape), whole or streamed", "completions",
            _streamable(responses.CompletionResponse, responses.CompletionChunk, "completions"),
            MODEL_CALL_ERRORS, CompletionRequest)},
        "/v1/chat/completions": {"post": _operation(
            "createChatCompletion", "Answer a conversation (OpenAI shape), whole or streamed", "completions",
            _streamable(responses.ChatCompletionResponse, responses.ChatCompletionChunk, "chat completion"),
            MODEL_CALL_ERRORS, ChatRequest)},
        "/v1/models": {"get": _operation(
            "listModels", "The services, as OpenAI models", "models",
            {"description": "Every service.", "content": _json(_ref(responses.ModelList))}, (401, 500))},
        "/v1/models/{id}": {"get": _operation(
            "retrieveModel", "One service, as an OpenAI model", "models",
            {"description": "The service.", "content": _json(_ref(responses.ModelCard))}, (401, 404, 500))
            | {"parameters": [model_id]}},
        "/health": {"get": _operation(
            "health", "Whether the gateway is alive", "operations",
            {"description": "Alive.", "content": _json(_ref(responses.Health))}, open_path=True)},
        "/ready": {"get": _operation(
            "ready", "Whether Triton and every service are ready", "operations",
            {"description": "Ready.", "content": _json(_ref(responses.Ready))}, (500, 503), open_path=True)},
        "/info": {"get": _operation(
            "info", "The version, each service's limits and model fingerprint, the gateway's options", "operations",
            {"description": "What this gateway serves and enforces.", "content": _json(_ref(responses.Info))},
            (401, 500))},
        "/metrics": {"get": _operation(
            "metrics", "Prometheus metrics", "operations",
            {"description": "The Prometheus text exposition format.",
             "content": {"text/plain": {"schema": {"type": "string"}}}}, open_path=True)},
        "/openapi.json": {"get": _operation(
            "openapi", "This document", "operations",
            {"description": "The OpenAPI document.", "content": _json({"type": "object"})}, open_path=True)},
        "/docs": {"get": _operation(
            "docs", "This document in Swagger UI (its files served by the gateway)", "operations",
            {"description": "An HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}},
            open_path=True)},
    }


def component_schemas() -> dict[str, Any]:
    """The request, response and error models' JSON Schemas, named as the document's ``$ref``s name them."""
    pairs = [(model, "validation") for model in REQUEST_MODELS] + [(model, "serialization") for model in
                                                                    RESPONSE_MODELS]
    _, top = models_json_schema(pairs, ref_template=REF)  # type: ignore[arg-type]
    schemas: dict[str, Any] = top["$defs"]
    return dict(sorted(schemas.items()))


def openapi_document(version: str = __version__) -> dict[str, Any]:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Sluice gateway",
            "version": version,
            "description": "OpenAI-compatible embeddings, completions and chat completions, and Cohere/Jina "
            "rerank, in front of Triton, with per-service rate limits, caching and deadlines. Every error is one "
            "envelope, `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
        },
        "tags": [{"name": name} for name in ("embeddings", "rerank", "completions", "models", "operations")],
        "paths": _paths(),
        "components": {
            "schemas": component_schemas(),
            "responses": {f"Error{status}": _error_response(status) for status in sorted(ERRORS)},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "One of the gateway's API keys (gateway.api_keys, SLUICE_API_KEYS); without keys, "
                "none is asked for."}},
        },
        # A key where the gateway has keys, nothing where it has none.
        "security": [{"bearer": []}, {}],
    }


@functools.cache
def _document_bytes() -> bytes:
    return orjson.dumps(openapi_document())


async def openapi_json(request: Request) -> Response:
    return Response(_document_bytes(), media_type="application/json")


DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Sluice gateway API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
// validatorUrl null: Swagger UI would otherwise send the document to validator.swagger.io for a badge.
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
                             presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});
</script>
</body>
</html>
"""


async def docs(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE)


@functools.cache
def swagger_ui_directory() -> Path:
    # Found, not imported: the package's Python side (templates, framework handlers) is not used.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or spec.origin is None:
        raise GatewayError("swagger-ui-py is not installed: /docs has no Swagger UI to serve")
    return Path(spec.origin).parent / "static"


async def docs_asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in DOCS_ASSETS:
        raise errors.RouteNotFound(f"no route {request.url.path}")
    return FileResponse(swagger_ui_directory() / name, media_type=DOCS_ASSETS[name],
                        headers={"cache-control": "public, max-age=86400"})
