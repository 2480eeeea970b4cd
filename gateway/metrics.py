"""Prometheus metrics of the gateway, per service, in a registry of the app's own (several apps per process in
tests, and no global state)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
        self.rate_limited = Counter("sluice_gateway_rate_limited", "Requests refused by a rate limit",
                                    ["service", "scope"], registry=r)
        self.cache_hits = Counter("sluice_gateway_cache_hits", "Items answered from the cache", ["service"],
                                  registry=r)
        self.cache_misses = Counter("sluice_gateway_cache_misses", "Items sent to Triton with caching on",
                                    ["service"], registry=r)
        self.in_flight = Gauge("sluice_gateway_in_flight", "Requests being served", ["service"], registry=r)
        self.deadlines = Counter("sluice_gateway_deadline_exceeded", "Requests past total or inference timeout",
                                 ["service"], registry=r)
        self.prompt_tokens = Counter("sluice_gateway_llm_prompt_tokens", "Prompt tokens", ["service"], registry=r)
        self.completion_tokens = Counter("sluice_gateway_llm_completion_tokens", "Generated tokens", ["service"],
                                         registry=r)
        self.first_token = Histogram("sluice_gateway_llm_time_to_first_token_seconds", "Arrival to first token",
                                     ["service"], buckets=_LATENCY_BUCKETS, registry=r)


class RequestMetrics:
    """ASGI middleware: stamps each request's arrival (``scope["state"]["arrival"]``, the start of its
    deadline) and, when the response is complete, counts it by the service the route recorded."""

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
                endpoint = scope["path"]
                self.metrics.requests.labels(service, endpoint, str(status)).inc()
                self.metrics.latency.labels(service, endpoint).observe(time.monotonic() - state["arrival"])
