"""POST /v1/embeddings (OpenAI shape)."""

from __future__ import annotations

import base64

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from .admission import admit, parse_body
from .encoders import cache_allowed, cache_headers, encode
from .errors import Unprocessable
from .protocol import EmbeddingRequest
from .state import Gateway, json_response


async def create_embeddings(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await parse_body(request, EmbeddingRequest)
    route = gateway.settings.resolve(body.model, ("embedding",))
    texts = body.texts()
    call = await admit(gateway, request, route, items=len(texts))
    async with call.deadline():
        encoded = await encode(gateway, call, [(text,) for text in texts], use_cache=cache_allowed(request))
    dimension = encoded.values.shape[1]
    if body.dimensions is not None and body.dimensions != dimension:
        raise Unprocessable(f"dimensions: {route.service} returns {dimension}, not {body.dimensions}",
                            param="dimensions")
    if body.encoding_format == "base64":
        vectors: list[object] = [
            base64.b64encode(row.astype("<f4").tobytes()).decode() for row in encoded.values
        ]
    else:
        vectors = list(encoded.values)
    tokens = int(encoded.tokens.sum())
    # responses.EmbeddingResponse, built as a dict: orjson writes the numpy rows directly, at less than half the
    # model's CPU (tests/test_openapi.py validates the dict against the document).
    payload = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)],
        "model": route.service,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "truncated": np.flatnonzero(encoded.truncated).tolist(),
        "cache": {"hits": encoded.hits, "misses": len(texts) - encoded.hits},
    }
    return json_response(payload, call.headers | cache_headers(encoded.hits, len(texts)))

