"""The gateway's errors: raised anywhere, turned into one JSON envelope by one set of handlers (app.py).

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, the OpenAI shape, so OpenAI clients
surface the message. ``envelope_bytes`` is its one serialiser: the app's handlers, the middleware's refusals and a
stream's final error event all send what it writes.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field


class GatewayError(Exception):
    """An error with its HTTP status; ``param`` names the request field at fault, when one is."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "bad_request"


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RouteNotFound(NotFound):
    """No route for the request's path (a model that does not exist is ``NotFound``)."""

    code = "not_found"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class Unprocessable(GatewayError):
    status, type, code = 422, "invalid_request_error", "invalid_value"


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Unavailable(GatewayError):
    """Triton turned the request away (queue full, queue timeout) or cannot be reached."""

    status, type, code = 503, "server_error", "unavailable"


class DeadlineExceeded(GatewayError):
    status, type, code = 504, "timeout_error", "deadline_exceeded"


class HTTPRefusal(GatewayError):
    """Another refusal of Starlette's own (an ``HTTPException``: method not allowed, mostly), with its status."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status = status


def envelope_bytes(error: GatewayError) -> bytes:
    """The error's envelope as JSON: the body of its response, or the data of a stream's last event."""
    return orjson.dumps(error.body())


class ErrorBody(BaseModel):
    """What ``GatewayError.body()`` writes under ``error`` (tests/test_openapi.py checks that every error class's
    body validates)."""

    model_config = ConfigDict(extra="forbid")

    message: str
    type: Literal["invalid_request_error", "authentication_error", "rate_limit_error", "server_error", "timeout_error"]
    param: str | None = Field(description="The request field at fault (`input.0`, `messages.0.role`), when one is.")
    code: str | None = Field(
        description="bad_request, invalid_api_key, model_not_found, not_found, payload_too_large, invalid_value, "
        "rate_limit_exceeded, unavailable, deadline_exceeded; null for other errors."
    )


class ErrorEnvelope(BaseModel):
    """Every error's body, and the data of a stream's last event when it fails mid-stream."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorBody
