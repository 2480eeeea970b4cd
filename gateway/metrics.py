"""Prometheus metrics of the gateway, per service, in a registry of the app's own (several apps per process in
tests, and no global state).

Routes reach a service's metrics through ``GatewayMetrics.of(service)``: children bound once per service, since
``labels()`` (a lock, a tuple, a dict lookup) on every count is a measurable part of a cache hit's CPU. A service
has only the series it can move (no time to first token for an embedding service, no cache counts where the cache
is off): its other fields are None. Counts that belong to one request (Triton time, cache hits and misses, LLM
tokens) also go to that request's access line (gateway/logs.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.manifest import Route

from .errors import DeadlineExceeded, GatewayError
from .logs import current_record, unanswered_status

_MERGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The service label of a request refused before its service was known (unknown model, invalid body, auth, size),
# and the endpoint label of a path the gateway does not serve: neither a model name nor a path from a client ever
# becomes a label value.
NO_SERVICE = "-"
NO_ENDPOINT = "-"


class _Tallied:
    """A metric child whose every count is also added to the current request's access record, field ``field``
    (``first_only``: only its first count is kept, as a request of several prompts has one time to first token)."""

    __slots__ = ("_child", "_field", "_first_only")

    def __init__(self, child: Any, field: str, *, first_only: bool = False) -> None:
        self._child = child
        self._field = field
        self._first_only = first_only

    def _tally(self, amount: float) -> None:
        record = current_record.get()
        if record is not None:
            so_far = getattr(record, self._field)
            if so_far is None:
                setattr(record, self._field, amount)
            elif not self._first_only:
                setattr(record, self._field, so_far + amount)


class _TalliedCounter(_Tallied):
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        self._child.inc(amount)
        self._tally(amount)


class _TalliedHistogram(_Tallied):
    __slots__ = ()

    def observe(self, amount: float) -> None:
        self._child.observe(amount)
        self._tally(amount)


@dataclass(frozen=True)
class ServiceMetrics:
    """One service's children of the gateway's metrics; None where the service cannot move the metric."""

    triton_latency: Any  # encoders (an LLM stream's time is its request's)
    merged: Any  # encoders
    rate_limited_by_key: Any  # with gateway.key_rate_limit
    rate_limited_by_service: Any
    cache_hits: Any  # with enable_cache
    cache_misses: Any  # with enable_cache
    in_flight: Any
    deadlines: Any
    prompt_tokens: Any  # llm
    completion_tokens: Any  # llm
    first_token: Any  # llm
    queue_depth: Any  # encoders


# gateway/scheduler.py's reasons for refusing an encoder request before any work.
ENCODER_REFUSALS = ("queue_full", "too_late", "queue_timeout")


def route_knobs(route: Route) -> dict[str, float]:
    """The knobs of ``route`` that ``sluice_gateway_knob`` exports. The manifest keeps ``instances`` (the calls
    the gateway keeps in flight: worker_count, times the GPUs on a GPU service) rather than worker_count."""
    return {
        "batch_size": route.batch_size,
        "batch_timeout": route.batch_timeout,
        "max_queue_size": route.max_queue_size,
        "instances": route.instances,
        "queue_timeout": route.queue_timeout,
        "inference_timeout": route.inference_timeout,
        "total_timeout": route.total_timeout,
        "rate_limit": route.rate_limit,
        "enable_cache": float(route.enable_cache),
    }


class GatewayMetrics:
    """The gateway's metrics for ``routes``; ``key_rate_limited``: whether API keys have a rate limit of their own;
    ``redis``: whether the gateway uses Redis (its up gauge and failure counter exist only then)."""

    def __init__(self, routes: Iterable[Route], *, key_rate_limited: bool = False, redis: bool = False) -> None:
        self.routes = {route.service: route for route in routes}
        self.key_rate_limited = key_rate_limited
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sluice_gateway_requests", "Requests by service, endpoint and HTTP status",
                                ["service", "endpoint", "status"], registry=r)
        self.latency = Histogram("sluice_gateway_request_seconds", "Arrival to last byte",
                                 ["service", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.triton_latency = Histogram("sluice_gateway_triton_seconds", "From handing a request's chunks to the "
                                        "batcher to their answers: waiting in the gateway's queue, then Triton",
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
        self.redis_up: Gauge | None = None
        self.redis_failures: Counter | None = None
        if redis:
            self.redis_up = Gauge("sluice_gateway_redis_up", "1 while Redis answers, 0 while it cannot be reached "
                                  "(gateway.redis_failure says what requests get meanwhile)", registry=r)
            self.redis_up.set(1)
            self.redis_failures = Counter("sluice_gateway_redis_failures", "Redis calls that failed: requests' "
                                          "calls and, while Redis is down, reconnection pings", registry=r)
        self.knobs = Gauge("sluice_gateway_knob", "Each service's compiled runtime knobs (config.yaml's names; "
                           "seconds, requests/s, enable_cache 0/1; instances: worker_count x GPUs), for dashboards "
                           "to draw limits beside what they bound", ["service", "knob"], registry=r)
        for route in self.routes.values():
            for knob, value in route_knobs(route).items():
                self.knobs.labels(route.service, knob).set(value)
        self._services: dict[str, ServiceMetrics] = {}
        self._per_request: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        for service, route in self.routes.items():  # every series a service can move exists from the start, at 0
            self.of(service)
            if route.type != "llm":  # so that rate() counts a service's very first refusals too
                for reason in ENCODER_REFUSALS:
                    self.refused.labels(service, reason)

    def of(self, service: str) -> ServiceMetrics:
        bound = self._services.get(service)
        if bound is None:
            route = self.routes[service]
            encoder, llm, cached = route.type != "llm", route.type == "llm", route.enable_cache
            bound = self._services[service] = ServiceMetrics(
                triton_latency=_TalliedHistogram(self.triton_latency.labels(service), "triton_seconds")
                if encoder else None,
                merged=self.merged.labels(service) if encoder else None,
                rate_limited_by_key=self.rate_limited.labels(service, "api_key") if self.key_rate_limited else None,
                rate_limited_by_service=self.rate_limited.labels(service, "service"),
                cache_hits=_TalliedCounter(self.cache_hits.labels(service), "cache_hits") if cached else None,
                cache_misses=_TalliedCounter(self.cache_misses.labels(service), "cache_misses") if cached else None,
                in_flight=self.in_flight.labels(service),
                deadlines=self.deadlines.labels(service),
                prompt_tokens=_TalliedCounter(self.prompt_tokens.labels(service), "prompt_tokens") if llm else None,
                completion_tokens=_TalliedCounter(self.completion_tokens.labels(service), "completion_tokens")
                if llm else None,
                first_token=_TalliedHistogram(self.first_token.labels(service), "first_token_seconds", first_only=True)
                if llm else None,
                queue_depth=self.queue_depth.labels(service) if encoder else None,
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
    deadline) and, when the response is complete, counts it: by the service the route recorded, or ``NO_SERVICE``
    when it was refused before one was known, and by its endpoint (``_endpoint``). A request of a service leaves
    the service's in-flight gauge (``admit`` put it in)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, endpoints: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["arrival"] = time.monotonic()
        status: int | None = None

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, record_status)
        except BaseException as exc:
            error = exc
            raise
        finally:
            service = state.get("service")
            if service is not None:
                self.metrics.of(service).in_flight.dec()
            self.metrics.answered(
                service or NO_SERVICE, self._endpoint(scope),
                status if status is not None else unanswered_status(error), time.monotonic() - state["arrival"],
            )

    def _endpoint(self, scope: Scope) -> str:
        """The path template of the route that took the request (``/v1/models/{id}``); for a request refused
        before routing, its path when that is one of ``endpoints``; otherwise ``NO_ENDPOINT``."""
        route = scope.get("route")  # set by Starlette's router once a route matches
        if route is not None:
            return str(route.path)
        path = scope["path"]
        return path if path in self.endpoints else NO_ENDPOINT
