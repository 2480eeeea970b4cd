"""Concurrent requests for one service, sent to Triton as one request.

Each single-text request costs the gateway a gRPC call (about 0.4 ms of CPU on the 2-core machines this runs on)
and Triton a request of its own. Requests that reach Triton in the same event-loop turn, for the same service and
outputs, go as one request of all their rows (at most the service's batch_size), and each caller gets its own rows
back. Nothing waits for company: the merged request leaves on the next loop turn, as a lone request would have, and
Triton's dynamic batcher still decides what runs together. docs/benchmarks.md has the figures.

A merged call gets the longest timeout of its callers: they share the service's inference_timeout, and only what is
left of their total deadlines differs, which each caller's own deadline enforces. A caller that gives up (its client
gone, its deadline passed) leaves the call, and the call is cancelled at Triton once no caller is left. Triton's
answer or refusal goes to every caller of the call, as an execution's outcome goes to every request in its batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .triton import Tensors, Triton

# service, outputs, input names, rows a request may carry: what requests must share to be sent as one.
_Key = tuple[str, tuple[str, ...], tuple[str, ...], int]


class _Call:
    """One Triton request and how many of its callers still wait for it."""

    __slots__ = ("task", "waiting")

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.task: asyncio.Task[None] | None = None


class _Caller:
    __slots__ = ("answer", "call", "inputs", "rows", "timeout")

    def __init__(self, inputs: Mapping[str, npt.NDArray[Any]], timeout: float, answer: asyncio.Future[Tensors]):
        self.inputs = inputs
        self.rows = len(next(iter(inputs.values())))
        self.timeout = timeout
        self.answer = answer
        self.call: _Call | None = None


class Coalescer:
    """``infer`` as ``Triton.infer``, with concurrent calls merged. ``on_call(service, callers)`` is told the size
    of each merge (for the metrics)."""

    def __init__(self, triton: Triton, on_call: Callable[[str, int], None] | None = None) -> None:
        self._triton = triton
        self._on_call = on_call
        self._pending: dict[_Key, list[_Caller]] = {}

    async def infer(
        self,
        service: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str],
        timeout: float,
        max_rows: int,
    ) -> Tensors:
        """The outputs of ``inputs``' rows (every input has the same rows, at most ``max_rows``)."""
        loop = asyncio.get_running_loop()
        key = (service, tuple(outputs), tuple(inputs), max_rows)
        caller = _Caller(inputs, timeout, loop.create_future())
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = []
            loop.call_soon(self._dispatch, key)
        pending.append(caller)
        try:
            return await caller.answer
        except asyncio.CancelledError:
            call = caller.call
            if call is not None:
                call.waiting -= 1
                if call.waiting == 0 and call.task is not None:
                    call.task.cancel()  # nobody wants the answer: stop the work at Triton
            raise

    def _dispatch(self, key: _Key) -> None:
        """Send this loop turn's callers for ``key``, as few requests of at most ``key``'s rows each."""
        max_rows = key[3]
        callers = [caller for caller in self._pending.pop(key) if not caller.answer.done()]
        start = 0
        while start < len(callers):
            rows, end = callers[start].rows, start + 1
            while end < len(callers) and rows + callers[end].rows <= max_rows:
                rows += callers[end].rows
                end += 1
            self._start(key, callers[start:end])
            start = end

    def _start(self, key: _Key, callers: list[_Caller]) -> None:
        call = _Call(len(callers))
        for caller in callers:
            caller.call = call
        call.task = asyncio.get_running_loop().create_task(self._send(key, callers))

    async def _send(self, key: _Key, callers: list[_Caller]) -> None:
        service, outputs, names, _ = key
        try:
            if len(callers) == 1:
                inputs = callers[0].inputs
            else:
                inputs = {name: np.concatenate([caller.inputs[name] for caller in callers]) for name in names}
            if self._on_call is not None:
                self._on_call(service, len(callers))
            tensors = await self._triton.infer(service, inputs, outputs, max(c.timeout for c in callers))
        except asyncio.CancelledError:
            raise  # every caller has left
        except Exception as error:  # noqa: BLE001 - every caller gets the failure (Triton's refusal, mostly)
            for caller in callers:
                if not caller.answer.done():
                    caller.answer.set_exception(error)
            return
        start = 0
        for caller in callers:
            end = start + caller.rows
            if not caller.answer.done():
                caller.answer.set_result({name: tensor[start:end] for name, tensor in tensors.items()})
            start = end
