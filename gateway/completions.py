"""POST /v1/completions and /v1/chat/completions (OpenAI shapes), streamed as server-sent events or whole.

Each prompt is one decoupled Triton request over a gRPC stream, carrying arrival + queue_timeout as its start-by
(the LLM engine refuses it, 503, if it cannot start by then). The whole response, stream included, runs under the
service's total deadline; each Triton stream under queue_timeout + inference_timeout. A stream's status is sent with
its first piece, so a refusal or an error before any text is an HTTP error as for a whole response; past that, an
error ends the stream with an error event, then ``[DONE]``. The Triton request is cancelled either way.

Bodies and chunks are dicts shaped as gateway/responses.py's CompletionResponse, CompletionChunk,
ChatCompletionResponse and ChatCompletionChunk: a model a chunk cost ten times the dict's CPU, and
tests/test_openapi.py validates what these endpoints send against the document.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from runtimes.signatures import (
    COMPLETION_TOKENS,
    FINISH_REASON,
    MAX_TOKENS,
    MESSAGES,
    PROMPT_TOKENS,
    SEED,
    STOP,
    TEMPERATURE,
    TEXT_INPUT,
    TEXT_OUTPUT,
    TOP_P,
)

from .admission import Call, admit, gather, parse_body
from .errors import DeadlineExceeded, GatewayError, Unprocessable, envelope_bytes
from .protocol import ChatRequest, CompletionRequest, _Sampling
from .state import json_response
from .triton import text_column

if TYPE_CHECKING:
    from .state import Gateway


# How long after queue_timeout + inference_timeout the gateway gives up on an LLM stream (within total_timeout).
LLM_BACKSTOP_GRACE_S = 0.5


@dataclass(frozen=True)
class Piece:
    text: str
    finish_reason: str  # "" until the last piece
    prompt_tokens: int
    completion_tokens: int


def _llm_inputs(body: _Sampling, max_tokens: int | None, text_name: str, text: str) -> dict[str, Any]:
    """One generation's inputs; ``text_name`` is the tensor ``text`` goes in (TEXT_INPUT or MESSAGES)."""
    inputs: dict[str, Any] = {text_name: text_column([text])}
    if max_tokens is not None:
        inputs[MAX_TOKENS] = np.array([[max_tokens]], np.int32)
    inputs[TEMPERATURE] = np.array([[body.temperature]], np.float32)
    inputs[TOP_P] = np.array([[body.top_p]], np.float32)
    if body.seed is not None:
        inputs[SEED] = np.array([[body.seed]], np.int64)
    if body.stop:
        inputs[STOP] = text_column([json.dumps(body.stop_list())])
    return inputs


async def generate(gateway: Gateway, call: Call, inputs: dict[str, Any], arrival: float) -> AsyncIterator[Piece]:
    """The pieces of one generation; raises DeadlineExceeded when the runtime stopped it for inference_timeout."""
    service = call.route.service
    metrics = gateway.metrics.of(service)
    first = True
    # The engine ends the request itself at queue_timeout (the start-by) or inference_timeout: the call's own
    # timeout is only a backstop and should not race the engine's answer (a cancellation crossing a completion is
    # where tritonserver 2.51's gRPC handlers have known races: server#7840, #8078).
    timeout = call.call_timeout(grace=LLM_BACKSTOP_GRACE_S)
    async for result in gateway.triton.stream(service, inputs, timeout, call.start_by_us()):
        piece = Piece(
            text=result[TEXT_OUTPUT].item().decode("utf-8"),
            finish_reason=result[FINISH_REASON].item().decode("utf-8"),
            prompt_tokens=int(result[PROMPT_TOKENS].item()),
            completion_tokens=int(result[COMPLETION_TOKENS].item()),
        )
        if first and piece.text:
            metrics.first_token.observe(time.monotonic() - arrival)
            first = False
        if piece.finish_reason:
            metrics.prompt_tokens.inc(piece.prompt_tokens)
            metrics.completion_tokens.inc(piece.completion_tokens)
            if piece.finish_reason == "timeout":
                raise DeadlineExceeded(
                    f"{service} stopped generating at its inference_timeout of {call.route.inference_timeout:g} s"
                )
        yield piece


async def collect(gateway: Gateway, call: Call, inputs: dict[str, Any], arrival: float) -> Piece:
    """A whole generation as one piece."""
    texts, last = [], None
    async for piece in generate(gateway, call, inputs, arrival):
        texts.append(piece.text)
        last = piece
    if last is None:
        raise GatewayError(f"{call.route.service} ended the stream without a final response")
    return Piece("".join(texts), last.finish_reason, last.prompt_tokens, last.completion_tokens)


def _usage(piece: Piece) -> dict[str, int]:
    return {
        "prompt_tokens": piece.prompt_tokens,
        "completion_tokens": piece.completion_tokens,
        "total_tokens": piece.prompt_tokens + piece.completion_tokens,
    }


async def create_completion(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await parse_body(request, CompletionRequest)
    route = gateway.settings.resolve(body.model, ("llm",))
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise Unprocessable("prompt: streaming takes one prompt", param="prompt")
    call = await admit(gateway, request, route, items=len(prompts), items_param="prompt")
    arrival = request.state.arrival
    requests = [_llm_inputs(body, body.max_tokens, TEXT_INPUT, prompt) for prompt in prompts]
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(piece: Piece) -> dict[str, Any]:
        choice = {"index": 0, "text": piece.text, "finish_reason": piece.finish_reason or None, "logprobs": None}
        return {"id": ident, "object": "text_completion", "created": created, "model": route.service,
                "choices": [choice]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _event_stream(gateway, call, generate(gateway, call, requests[0], arrival), chunk, include_usage)
    async with call.deadline():
        pieces = await gather(*(collect(gateway, call, inputs, arrival) for inputs in requests))
    totals = Piece("", "", sum(p.prompt_tokens for p in pieces), sum(p.completion_tokens for p in pieces))
    return json_response({
        "id": ident, "object": "text_completion", "created": created, "model": route.service,
        "choices": [
            {"index": i, "text": p.text, "finish_reason": p.finish_reason, "logprobs": None}
            for i, p in enumerate(pieces)
        ],
        "usage": _usage(totals),
    }, call.headers)


async def create_chat_completion(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await parse_body(request, ChatRequest)
    route = gateway.settings.resolve(body.model, ("llm",))
    call = await admit(gateway, request, route)
    messages = json.dumps([{"role": m.role, "content": m.text()} for m in body.messages])
    inputs = _llm_inputs(body, body.token_limit(), MESSAGES, messages)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    role_sent = False

    def chunk(piece: Piece) -> dict[str, Any]:
        nonlocal role_sent
        delta: dict[str, str] = {"content": piece.text} if piece.text or not piece.finish_reason else {}
        if not role_sent:
            delta = {"role": "assistant", **delta}
            role_sent = True
        choice = {"index": 0, "delta": delta, "finish_reason": piece.finish_reason or None, "logprobs": None}
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": route.service,
                "choices": [choice]}

    arrival = request.state.arrival
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _event_stream(gateway, call, generate(gateway, call, inputs, arrival), chunk, include_usage)
    async with call.deadline():
        piece = await collect(gateway, call, inputs, arrival)
    return json_response({
        "id": ident, "object": "chat.completion", "created": created, "model": route.service,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": piece.text},
            "finish_reason": piece.finish_reason,
            "logprobs": None,
        }],
        "usage": _usage(piece),
    }, call.headers)


async def _event_stream(
    gateway: Gateway,
    call: Call,
    pieces: AsyncIterator[Piece],
    chunk: Callable[[Piece], dict[str, Any]],
    include_usage: bool,
) -> StreamingResponse:
    # The first piece is awaited before the status goes out: a refusal (503 with Retry-After), a bad prompt (400)
    # or the deadline (504) before any text is then an HTTP status a client can act on, not a 200 with an error.
    async with call.deadline():
        first = await anext(pieces, None)

    async def events() -> AsyncIterator[bytes]:
        last: Piece | None = None
        try:
            async with call.deadline():
                if first is not None:
                    last = first
                    yield _sse(orjson.dumps(chunk(first)))
                async for piece in pieces:
                    last = piece
                    yield _sse(orjson.dumps(chunk(piece)))
        except GatewayError as error:  # a stream cannot change its status: the error is its last event
            gateway.metrics.failed(call.route.service, error)  # never reaches app.py's handler, which counts
            yield _sse(envelope_bytes(error))
        else:
            if include_usage and last is not None:
                usage_chunk = chunk(last) | {"choices": [], "usage": _usage(last)}
                yield _sse(orjson.dumps(usage_chunk))
        yield b"data: [DONE]\n\n"

    headers = call.headers | {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
