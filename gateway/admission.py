"""Admitting a request to a service: its deadline (total_timeout from arrival), its rate limits, its body.

Every endpoint goes through ``admit`` once it knows the service, and runs its work under ``call.deadline()``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from sluice.manifest import Route

from .errors import BadRequest, DeadlineExceeded, GatewayError, PayloadTooLarge, RateLimited, Unprocessable
from .ratelimit import limit_for_rate

if TYPE_CHECKING:
    from .state import Gateway

Body = TypeVar("Body", bound=BaseModel)
Result = TypeVar("Result")

# Parts of a pydantic error location that name union branches, not fields (e.g. "list[constrained-str]").
_NOT_FIELDS = {"str", "int", "float", "bool", "list", "dict", "none"}


@dataclass
class Call:
    """One admitted request: its service, when it arrived, the moment its total deadline passes, and headers for the
    response."""

    route: Route
    arrival: float  # time.monotonic() at arrival
    expires: float  # time.monotonic() at which its total_timeout budget runs out
    headers: dict[str, str] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def call_timeout(self, grace: float = 0.0) -> float:
        """The timeout of the next Triton call: its time in Triton's queue (queue_timeout) plus its time in the
        model (inference_timeout), plus ``grace``, or what is left of the total deadline if that is less."""
        return min(self.route.queue_timeout + self.route.inference_timeout + grace, self.remaining())

    def start_by_us(self) -> int:
        """When Triton must have started this call (arrival + queue_timeout), as the runtimes read it: wall-clock
        microseconds (START_BY_PARAMETER)."""
        start_by = self.arrival + self.route.queue_timeout
        return round((time.time() + start_by - time.monotonic()) * 1e6)

    def deadline(self) -> _Deadline:
        """``async with call.deadline():`` runs the block under the total deadline; past it, DeadlineExceeded
        (and the block's calls are cancelled)."""
        return _Deadline(self)

    def expired(self) -> DeadlineExceeded:
        budget = self.expires - self.arrival
        return DeadlineExceeded(f"{self.route.service} did not finish within its total_timeout budget of {budget:g} s")


class _Deadline:
    """``Call.deadline()``: asyncio's timeout, its TimeoutError turned into the client's 504. A class rather than
    an ``asynccontextmanager``, whose generator machinery cost a measurable part of each request's CPU."""

    __slots__ = ("_call", "_timeout")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout_at(loop.time() + self._call.remaining())
        await self._timeout.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._timeout is not None
        try:
            await self._timeout.__aexit__(exc_type, exc, traceback)
        except TimeoutError:
            raise self._call.expired() from None
        if exc_type is not None and issubclass(exc_type, TimeoutError):  # a timeout of the block's own
            raise self._call.expired() from None


async def gather(*work: Coroutine[Any, Any, Result]) -> list[Result]:
    """Run ``work`` concurrently; the first failure cancels the rest and is raised as itself (the client's
    answer), not wrapped in an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(each) for each in work]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The request body as ``model``; 400 for invalid JSON, 422 naming the first field at fault."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _body_error(exc) from None


def _body_error(exc: ValidationError) -> GatewayError:
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return BadRequest(f"the body is not valid JSON: {errors[0]['ctx'].get('error', '')}".rstrip(": "))
    # A union reports one error per branch: a broken constraint says more than "wrong type" does, and among
    # type errors the deepest location is the most precise (input.0 rather than input).
    constraint = [e for e in errors if not e["type"].endswith("_type")]
    chosen = constraint[0] if constraint else max(errors, key=lambda e: len(e["loc"]))
    parts = [p for p in chosen["loc"] if isinstance(p, int) or (p.isidentifier() and p.islower())]
    param = ".".join(str(p) for p in parts if p not in _NOT_FIELDS) or "body"
    message = str(chosen["msg"])
    if chosen["type"] == "extra_forbidden":
        message = "unknown field"
    more = len({tuple(e["loc"][:1]) for e in errors}) - 1
    suffix = f" (and {more} more field{'s' if more > 1 else ''})" if more > 0 else ""
    return Unprocessable(f"{param}: {message}{suffix}", param=param)


def budget_units(route: Route, items: int) -> int:
    """What a request of ``items`` items counts as: an embedding or rerank request is ceil(items / batch_size)
    requests (the chunks Triton receives), each with its own total_timeout and rate-limit unit; an LLM request is
    one."""
    return 1 if route.type == "llm" else max(1, math.ceil(items / route.batch_size))


async def admit(
    gateway: Gateway, request: Request, route: Route, items: int = 1, items_param: str = "input"
) -> Call:
    """Start a call to ``route``: check the item count and spend rate-limit budget, or raise."""
    request.state.service = route.service  # from here on, RequestMetrics counts the request for the service
    gateway.metrics.of(route.service).in_flight.inc()
    if items > gateway.settings.max_items:
        raise PayloadTooLarge(
            f"{items_param}: {items} items in one request; at most {gateway.settings.max_items}", param=items_param
        )
    arrival = getattr(request.state, "arrival", time.monotonic())
    units = budget_units(route, items)
    budget = limit_for_rate(route.rate_limit)
    if units > budget.amount:  # refused by the rate limit whenever it came: say so now, and how to fit
        raise PayloadTooLarge(
            f"{items_param}: {items} items count as {units} requests of {route.batch_size} toward {route.service}'s "
            f"rate_limit, which admits {budget.amount} per {budget.get_expiry()} s; send at most "
            f"{budget.amount * route.batch_size} items a request",
            param=items_param,
        )
    call = Call(route, arrival, arrival + units * route.total_timeout)
    if call.remaining() <= 0:  # the body took the whole deadline to arrive
        raise call.expired()
    # The per-key budget is checked first: a request refused for its key then costs the service nothing.
    digest = getattr(request.state, "api_key_digest", None)
    key_rate = gateway.settings.key_rate_limit
    if digest and key_rate:
        per_key = await gateway.limiter.acquire(f"key:{digest}", key_rate)
        if not per_key.allowed:
            gateway.metrics.of(route.service).rate_limited_by_key.inc()
            raise RateLimited(f"this API key allows {key_rate:g} requests per second", headers=per_key.headers())
    decision = await gateway.limiter.acquire(f"service:{route.service}", route.rate_limit, amount=units)
    if not decision.allowed:
        gateway.metrics.of(route.service).rate_limited_by_service.inc()
        raise RateLimited(
            f"{route.service} allows {route.rate_limit:g} requests per second; retry later",
            headers=decision.headers(),
        )
    call.headers.update(decision.headers())
    return call
