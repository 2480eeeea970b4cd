"""What every request handler reaches through ``request.app.state.gateway``, and the JSON response makers: one for
answers, one for errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from .batcher import Batcher
from .cache import ItemCache
from .errors import GatewayError, envelope_bytes
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter
from .settings import GatewaySettings
from .triton import Triton


@dataclass
class Gateway:
    """What every request needs, opened by the lifespan."""

    settings: GatewaySettings
    triton: Triton
    batcher: Batcher  # embeddings and rerank reach Triton through it
    limiter: RateLimiter
    cache: ItemCache
    metrics: GatewayMetrics


def json_response(payload: Any, headers: dict[str, str] | None = None, status: int = 200) -> Response:
    # orjson writes numpy arrays (embeddings) directly, without a list of Python floats in between.
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def error_response(error: GatewayError) -> Response:
    """``error``'s envelope, status and headers, as the app's handlers answer every error."""
    return Response(envelope_bytes(error), status_code=error.status, headers=error.headers,
                    media_type="application/json")
