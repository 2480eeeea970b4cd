"""The gateway application: ``create_app(settings)`` builds it; its lifespan opens and closes the Triton channel,
the rate-limit storage and the cache. No module-level state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtimes.signatures import output_names
from sluice import __version__
from sluice.manifest import Route as ServiceRoute

from .batcher import Batcher
from .cache import create_cache
from .completions import create_chat_completion, create_completion
from .embeddings import create_embeddings
from .errors import GatewayError, HTTPRefusal, RouteNotFound, Unavailable
from .metrics import GatewayMetrics, RequestMetrics
from .middleware import AccessLog, BearerAuth, BodySizeLimit, CancelOnDisconnect
from .openapi import OPEN_PATHS as DOCS_OPEN_PATHS
from .openapi import docs, docs_asset, openapi_json
from .ratelimit import RateLimiter
from .redis_link import RedisLink
from .rerank import rerank
from .responses import Info
from .settings import GatewaySettings
from .state import Gateway, error_response, json_response
from .triton import Triton

log = logging.getLogger("sluice.gateway")
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"}) | DOCS_OPEN_PATHS


def create_app(settings: GatewaySettings) -> Starlette:
    metrics = GatewayMetrics(settings.routes.values(), key_rate_limited=bool(settings.key_rate_limit),
                             redis=settings.redis_url is not None)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        triton = Triton(settings.triton_grpc)
        link = redis_link(settings, metrics)
        if link is not None:
            await link.start()  # a Redis down at start-up is down from the first request (bounded: never hangs)
        gateway = Gateway(
            settings=settings,
            triton=triton,
            batcher=Batcher(
                triton,
                {name: route for name, route in settings.routes.items() if route.type != "llm"},
                output_names,
                on_call=lambda service, chunks: metrics.of(service).merged.observe(chunks),
                on_refusal=lambda service, reason: metrics.refused.labels(service, reason).inc(),
                on_depth=lambda service, depth: metrics.of(service).queue_depth.set(depth),
                replicas=settings.triton_replicas,
            ),
            limiter=RateLimiter.from_url(settings.redis_url, link),
            cache=create_cache(settings.redis_url, settings.cache_max_items, link=link),
            metrics=metrics,
        )
        app.state.gateway = gateway
        try:
            yield
        finally:
            # Close the Triton channel before Triton stops: an idle connection holds its shutdown.
            await gateway.batcher.close()
            await gateway.triton.close()
            await gateway.limiter.close()
            await gateway.cache.close()
            if link is not None:
                await link.close()

    routes = [
        Route("/v1/embeddings", create_embeddings, methods=["POST"]),
        Route("/v1/rerank", rerank, methods=["POST"]),
        Route("/v2/rerank", rerank, methods=["POST"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{id}", retrieve_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/docs/static/{name}", docs_asset, methods=["GET"]),
    ]
    middleware = [
        Middleware(AccessLog),
        Middleware(RequestMetrics, metrics=metrics, endpoints=[route.path for route in routes]),
        Middleware(CancelOnDisconnect),
        Middleware(BearerAuth, key_digests=settings.key_digests, exempt_paths=OPEN_PATHS),
        Middleware(BodySizeLimit, max_bytes=settings.max_request_bytes),
    ]
    handlers: dict[Any, Any] = {
        GatewayError: gateway_error,
        HTTPException: http_error,
        Exception: unexpected_error,
    }
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)


def redis_link(settings: GatewaySettings, metrics: GatewayMetrics) -> RedisLink | None:
    """Redis's state for the limiter and the cache, moving ``sluice_gateway_redis_*``; None without Redis."""
    if settings.redis_url is None:
        return None
    up, failures = metrics.redis_up, metrics.redis_failures
    assert up is not None and failures is not None  # GatewayMetrics(redis=True) made them
    return RedisLink(settings.redis_url, settings.redis_failure, on_state=lambda is_up: up.set(int(is_up)),
                     on_failure=failures.inc)


async def gateway_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, GatewayError)
    if service := getattr(request.state, "service", None):
        request.app.state.gateway.metrics.failed(service, error)
    return error_response(error)


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    headers = dict(error.headers or {})
    if error.status_code == 404:
        return error_response(RouteNotFound(f"no route {request.url.path}", headers=headers))
    return error_response(HTTPRefusal(error.status_code, str(error.detail), headers=headers))


async def unexpected_error(request: Request, error: Exception) -> Response:
    # Starlette sends this response from outside every middleware: AccessLog cannot add the request's id to it.
    request_id = getattr(request.state, "request_id", None)
    log.exception("unexpected error on %s (request_id=%s)", request.url.path, request_id, exc_info=error)
    response = error_response(GatewayError("internal error; see the gateway log"))
    if request_id is not None:
        response.headers["x-request-id"] = request_id
    return response


async def list_models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    data = [model_card(route) for route in sorted(gateway.settings.routes.values(), key=lambda r: r.service)]
    return json_response({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    """One entry of /v1/models: ``id`` is a service, or a model key that one service serves; 404 otherwise."""
    gateway: Gateway = request.app.state.gateway
    route = gateway.settings.resolve(request.path_params["id"], ("embedding", "reranker", "llm"))
    return json_response(model_card(route))


def model_card(route: ServiceRoute) -> dict[str, Any]:
    """A service as an OpenAI model object (responses.ModelCard)."""
    return {"id": route.service, "object": "model", "created": 0, "owned_by": "sluice", "type": route.type,
            "model": route.model}


async def health(request: Request) -> Response:
    return json_response({"status": "alive"})


async def ready(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    missing = await gateway.triton.ready(sorted(gateway.settings.routes))
    if missing:
        raise Unavailable(f"not ready: {', '.join(missing)}", headers={"Retry-After": "1"})
    return json_response({"status": "ready", "services": sorted(gateway.settings.routes)})


async def info(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return json_response(Info.of(gateway.settings, __version__).model_dump(mode="json"))


async def prometheus(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
