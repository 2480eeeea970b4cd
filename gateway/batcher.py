"""The embedding and reranker services' queues, driven: requests wait here and reach Triton as batches, at most one
call per model instance at a time (gateway/scheduler.py says why and decides; this module keeps the time).

A request's rows go as chunks of at most ``batch_size`` rows. Each chunk waits in its service's queue until a slot
is free, then leaves with other waiting chunks in one Triton call of at most ``batch_size`` rows, and every caller
gets its own rows back. Each call tells the runtime the moment its batch must start by (START_BY_PARAMETER): with
one gateway that start is immediate, but behind several gateways sharing a Triton it is what keeps Triton from
computing a request whose client was already refused.

A caller that leaves (its client gone, its deadline passed) takes its waiting chunks out of the queue; a call is
cancelled at Triton once none of its callers is left (and the runtime stops computing it). Triton's answer or
refusal goes to every caller of the call. A call that ran out of time or was cancelled tells the cost model only
that it cost at least that long (ServiceQueue.finished).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.manifest import Route

from .errors import DeadlineExceeded, GatewayError, Unavailable
from .scheduler import WAITING, Chunk, Refusal, ServiceQueue
from .triton import Tensors, Triton

Inputs = Mapping[str, npt.NDArray[Any]]


@dataclass(eq=False)
class _Call:
    """One Triton call and how many of its callers still wait for it."""

    waiting: int
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Pending:
    inputs: Inputs
    answer: asyncio.Future[Tensors]
    call: _Call | None = None
    settled: bool = False  # its call delivered an answer or an error to it


@dataclass(eq=False)
class _Service:
    route: Route
    outputs: tuple[str, ...]
    queue: ServiceQueue
    timer: asyncio.TimerHandle | None = None
    timer_at: float = math.inf
    calls: set[asyncio.Task[None]] = field(default_factory=set)


class Batcher:
    """``infer`` sends a request's chunks through its service's queue. ``on_call(service, chunks)`` is told how many
    chunks each call carried; ``on_refusal(service, reason)`` each refusal; ``on_depth(service, chunks)`` the queue's
    depth when it changes (the metrics). With ``replicas`` Tritons behind the channel, a service keeps a call in
    flight per model instance on each."""

    def __init__(
        self,
        triton: Triton,
        routes: Mapping[str, Route],
        outputs: Callable[[str], tuple[str, ...]],
        on_call: Callable[[str, int], None] = lambda service, chunks: None,
        on_refusal: Callable[[str, str], None] = lambda service, reason: None,
        on_depth: Callable[[str, int], None] = lambda service, depth: None,
        replicas: int = 1,
    ) -> None:
        self._triton = triton
        self._on_call, self._on_refusal, self._on_depth = on_call, on_refusal, on_depth
        self._services = {
            name: _Service(route, outputs(route.type), ServiceQueue(
                batch_size=route.batch_size, max_queue_size=route.max_queue_size, slots=route.instances * replicas,
                batch_timeout=route.batch_timeout,
            ))
            for name, route in routes.items()
        }

    async def infer(self, route: Route, chunks: Sequence[Inputs], arrival: float, finish_by: float) -> list[Tensors]:
        """The outputs of each chunk (each at most ``batch_size`` rows), in order. ``arrival`` and ``finish_by``
        (time.monotonic()) are the request's: chunk k gets the budgets of a request of its own that arrived
        k x total_timeout later, so a big request is not refused for its size alone (README, "Big requests")."""
        service = self._services[route.service]
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        queued = [
            Chunk(
                rows=len(next(iter(inputs.values()))),
                start_by=min(arrival + k * route.total_timeout + route.queue_timeout, finish_by),
                finish_by=finish_by,
                payload=_Pending(inputs, loop.create_future()),
                later=k > 0,
            )
            for k, inputs in enumerate(chunks)
        ]
        refusal = service.queue.admit(now, queued)
        if refusal is not None:
            raise self._refused(route.service, refusal)
        service.queue.add(now, queued)
        self._pump(service)
        try:
            return list(await asyncio.gather(*(chunk.payload.answer for chunk in queued)))
        except BaseException:
            for chunk in queued:
                self._leave(service, chunk)
            raise

    async def close(self) -> None:
        for service in self._services.values():
            if service.timer is not None:
                service.timer.cancel()
            for task in list(service.calls):
                task.cancel()

    # ---- driving the queue ---------------------------------------------------------------------------------------

    def _pump(self, service: _Service) -> None:
        """Refuse what expired, send what can go, and set the timer for the next moment to look again."""
        now = time.monotonic()
        queue = service.queue
        for chunk in queue.expire(now):
            refusal = Refusal("queue_timeout", f"waited longer than its queue_timeout of "
                              f"{service.route.queue_timeout:g} s", 1.0)
            self._fail(chunk, self._refused(service.route.service, refusal))
        while (call := queue.next_call(now)) is not None:
            key, chunks = call
            shared = _Call(waiting=len(chunks))
            for chunk in chunks:
                chunk.payload.call = shared
            shared.task = asyncio.get_running_loop().create_task(self._send(service, key, chunks))
            service.calls.add(shared.task)
            shared.task.add_done_callback(service.calls.discard)
        self._on_depth(service.route.service, queue.waiting_chunks)
        wake = queue.wake_at(now)
        if wake is not None and wake < service.timer_at:
            if service.timer is not None:
                service.timer.cancel()
            service.timer_at = wake
            # loop.time() is time.monotonic() on every platform asyncio runs on here.
            service.timer = asyncio.get_running_loop().call_at(wake, self._wake, service)

    def _wake(self, service: _Service) -> None:
        service.timer, service.timer_at = None, math.inf
        self._pump(service)

    async def _send(self, service: _Service, key: int, chunks: list[Chunk]) -> None:
        route = service.route
        measured = stopped = False
        try:
            pending = [chunk.payload for chunk in chunks]
            if len(pending) == 1:
                inputs = pending[0].inputs
            else:
                inputs = {name: np.concatenate([p.inputs[name] for p in pending]) for name in pending[0].inputs}
            self._on_call(route.service, len(chunks))
            now = time.monotonic()
            latest = max(chunk.finish_by for chunk in chunks)
            start_by = max(chunk.start_by for chunk in chunks)
            tensors = await self._triton.infer(
                route.service, inputs, service.outputs,
                timeout=min(route.queue_timeout + route.inference_timeout, latest - now),
                start_by_us=round((time.time() + start_by - now) * 1e6),
            )
            measured = True
        except asyncio.CancelledError:
            stopped = True
            raise  # every caller has left
        except Exception as error:  # noqa: BLE001 - every caller gets the failure (Triton's refusal, mostly)
            stopped = isinstance(error, DeadlineExceeded)  # the runtime's inference_timeout or the call's timeout
            for chunk in chunks:
                self._fail(chunk, error)
        else:
            start = 0
            for chunk in chunks:
                end = start + chunk.rows
                chunk.payload.settled = True
                if not chunk.payload.answer.done():
                    chunk.payload.answer.set_result({name: tensor[start:end] for name, tensor in tensors.items()})
                start = end
        finally:
            service.queue.finished(key, time.monotonic(), measured, stopped=stopped)
            self._pump(service)

    def _leave(self, service: _Service, chunk: Chunk) -> None:
        """The caller of ``chunk`` gave up: out of the queue, or out of its call (cancelled when no one is left)."""
        pending: _Pending = chunk.payload
        was_waiting = chunk.state == WAITING
        service.queue.remove(chunk)
        if was_waiting:
            self._on_depth(service.route.service, service.queue.waiting_chunks)
        call = pending.call
        if call is not None and not pending.settled:
            pending.settled = True
            pending.answer.cancel()
            call.waiting -= 1
            if call.waiting == 0 and call.task is not None:
                call.task.cancel()  # nobody wants the answer: stop the work at Triton

    def _fail(self, chunk: Chunk, error: BaseException) -> None:
        chunk.payload.settled = True
        if not chunk.payload.answer.done():
            chunk.payload.answer.set_exception(error)

    def _refused(self, service: str, refusal: Refusal) -> GatewayError:
        self._on_refusal(service, refusal.reason)
        retry_after = str(max(1, math.ceil(refusal.retry_after)))
        return Unavailable(f"{service} is overloaded: {refusal.message}; retry later",
                           headers={"Retry-After": retry_after})
