"""POST /v1/rerank (and /v2/rerank): Cohere v2 and Jina request shapes, results sorted by relevance."""

from __future__ import annotations

import uuid

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from .admission import admit, parse_body
from .encoders import cache_allowed, cache_headers, encode
from .protocol import RerankRequest
from .state import Gateway, json_response


async def rerank(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await parse_body(request, RerankRequest)
    route = gateway.settings.resolve(body.model, ("reranker",))
    documents = body.document_texts()
    call = await admit(gateway, request, route, items=len(documents), items_param="documents")
    async with call.deadline():
        encoded = await encode(gateway, call, [(body.query, doc) for doc in documents], cache_allowed(request))
    order = np.argsort(-encoded.values, kind="stable")[: body.top_n]
    results = []
    for index in order.tolist():
        result: dict[str, object] = {"index": index, "relevance_score": float(encoded.values[index])}
        if body.return_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    tokens = int(encoded.tokens.sum())
    # responses.RerankResponse, built as a dict at a sixth of the model's CPU (tests/test_openapi.py validates it).
    payload = {
        "id": str(uuid.uuid4()),
        "model": route.service,
        "results": results,
        "usage": {"total_tokens": tokens},
        "meta": {"billed_units": {"search_units": 1}, "truncated": np.flatnonzero(encoded.truncated).tolist()},
        "cache": {"hits": encoded.hits, "misses": len(documents) - encoded.hits},
    }
    return json_response(payload, call.headers | cache_headers(encoded.hits, len(documents)))
