"""Prometheus metrics of the gateway, per service, in a registry of the app's own (several apps per process in
tests, and no global state).

Routes reach a service's metrics through ``GatewayMetrics.of(service)``: children bound once per service, since
``labels()`` (a lock, a tuple, a dict lookup) on every count is a measurable part of a cache hit's CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import DeadlineExceeded, GatewayError

_MERGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class ServiceMetrics:
    """One service's children of the gateway's metrics."""

    triton_latency: Any
    merged: Any
    rate_limited_by_key: Any
    rate_limited_by_service: Any
    cache_hits: Any
    cache_misses: Any
    in_flight: Any
    deadlines: Any
    prompt_tokens: Any
    completion_tokens: Any
    first_token: Any
    queue_depth: Any


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sluice_gateway_requests", "Requests by service, endpoint and HTTP status",
                                ["service", "endpoint", "status"], registry=r)
        self.latency = Histogram("sluice_gateway_request_seconds", "Arrival to last byte",
                                 ["service", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.triton_latency = Histogram("sluice_gateway_triton_seconds", "Time in each Triton call",
                                        ["service"], buckets=_LATENCY_BUCKETS, registry=r)
        self.merged = Histogram("sluice_gateway_triton_call_requests",
                                "Gateway requests sent as each Triton call (concurrent requests merged)",
                                ["service"], buckets=_MERGE_BUCKETS, registry=r)
        self.rate_limited = Counter("sluice_gateway_rate_limited", "Requests refused by a rate limit",
                                    ["service", "scope"], registry=r)
        self.cache_hits = Counter("sluice_gateway_cache_hits", "Items answered from the cache", ["service"],
                                  registry=r)
        self.cache_misses = Counter("sluice_gateway_cache_misses", "Items sent to Triton with caching on",
                                    ["service"], registry=r)
        self.in_flight = Gauge("sluice_gateway_in_flight", "Requests admitted and not yet answered", ["service"],
                               registry=r)
        self.deadlines = Counter("sluice_gateway_deadline_exceeded", "Requests past total or inference timeout",
                                 ["service"], registry=r)
        self.prompt_tokens = Counter("sluice_gateway_llm_prompt_tokens", "Prompt tokens", ["service"], registry=r)
        self.completion_tokens = Counter("sluice_gateway_llm_completion_tokens", "Generated tokens", ["service"],
                                         registry=r)
        self.first_token = Histogram("sluice_gateway_llm_time_to_first_token_seconds", "Arrival to first token",
                                     ["service"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sluice_gateway_queue_depth",
                                 "Requests (chunks of at most batch_size items) waiting in the gateway for a model "
                                 "instance", ["service"], registry=r)
        self.refused = Counter("sluice_gateway_refused", "Requests refused before any work, by reason: queue_full, "
                               "too_late (could not be served in time), queue_timeout (waited past it)",
                               ["service", "reason"], registry=r)
        self._services: dict[str, ServiceMetrics] = {}
        self._per_request: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def of(self, service: str) -> ServiceMetrics:
        bound = self._services.get(service)
        if bound is None:
            bound = self._services[service] = ServiceMetrics(
                triton_latency=self.triton_latency.labels(service),
                merged=self.merged.labels(service),
                rate_limited_by_key=self.rate_limited.labels(service, "api_key"),
                rate_limited_by_service=self.rate_limited.labels(service, "service"),
                cache_hits=self.cache_hits.labels(service),
                cache_misses=self.cache_misses.labels(service),
                in_flight=self.in_flight.labels(service),
                deadlines=self.deadlines.labels(service),
                prompt_tokens=self.prompt_tokens.labels(service),
                completion_tokens=self.completion_tokens.labels(service),
                first_token=self.first_token.labels(service),
                queue_depth=self.queue_depth.labels(service),
            )
        return bound

    def answered(self, service: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency, arrival to last byte."""
        children = self._per_request.get((service, endpoint, status))
        if children is None:
            children = self._per_request[(service, endpoint, status)] = (
                self.requests.labels(service, endpoint, str(status)), self.latency.labels(service, endpoint)
            )
        children[0].inc()
        children[1].observe(seconds)

    def failed(self, service: str, error: GatewayError) -> None:
        """Count the error a request of ``service`` was answered with: its response (app.py's handler) or, once a
        stream has begun and its status is sent, the stream's last event (completions.py). The one place that
        counts deadlines, so a deadline passing mid-stream counts as one passing before the answer does."""
        if isinstance(error, DeadlineExceeded):
            self.of(service).deadlines.inc()


class RequestMetrics:
    """ASGI middleware: stamps each request's arrival (``scope["state"]["arrival"]``, the start of its
    deadline) and, when the response is complete, counts it by the service the route recorded and takes it out
    of the service's in-flight gauge (``admit`` put it in)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["arrival"] = time.monotonic()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            service = state.get("service")
            if service is not None:
                self.metrics.of(service).in_flight.dec()
                self.metrics.answered(service, scope["path"], status, time.monotonic() - state["arrival"])
