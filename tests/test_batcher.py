"""The batcher (gateway/batcher.py) against a fake Triton: what each caller receives, what Triton is sent and when,
and what is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from gateway.batcher import Batcher
from gateway.errors import GatewayError, Unavailable
from tests.gateway_fakes import route

Result = TypeVar("Result")


@dataclass(frozen=True)
class Sent:
    """One request the fake Triton received."""

    rows: list[int]  # the values of input "x", one a row
    timeout: float
    start_by_us: int | None
    at: float


class FakeTriton:
    """``Triton.infer`` as the batcher calls it: answers output "y" with the rows of input ``x`` (so each caller can
    tell its own rows); holds every call until ``release`` is set, when given one; raises ``failure``, when given
    one. Records what it was sent and whether a call was cancelled while it waited."""

    def __init__(self, release: asyncio.Event | None = None, failure: Exception | None = None) -> None:
        self.release = release
        self.failure = failure
        self.sent: list[Sent] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cancelled_calls = 0

    async def infer(self, service: str, inputs: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str],
                    timeout: float, start_by_us: int | None = None) -> dict[str, npt.NDArray[Any]]:
        self.sent.append(Sent(inputs["x"].reshape(-1).tolist(), timeout, start_by_us, time.monotonic()))
        self.started.set()
        try:
            if self.release is not None:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled_calls += 1
            self.cancelled.set()
            raise
        if self.failure is not None:
            raise self.failure
        return {name: inputs["x"].copy() for name in outputs}


def rows(*values: int) -> dict[str, npt.NDArray[np.int64]]:
    return {"x": np.array([[value] for value in values], dtype=np.int64)}


def run(scenario: Callable[[], Awaitable[Result]]) -> Result:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=5))


SERVICE = route("svc", "embedding", batch_size=4, max_queue_size=10, instances=1, queue_timeout=0.2,
                total_timeout=1.0, inference_timeout=0.5)


def batcher(triton: FakeTriton, refusals: list[str] | None = None, **changes: Any) -> tuple[Batcher, Any]:
    service = SERVICE.model_copy(update=changes)
    on_refusal = (lambda _, reason: refusals.append(reason)) if refusals is not None else (lambda _, reason: None)
    return Batcher(triton, {"svc": service}, lambda _: ("y",), on_refusal=on_refusal), service  # type: ignore[arg-type]


def infer(b: Batcher, service: Any, *chunks: dict[str, Any]) -> Awaitable[list[dict[str, Any]]]:
    now = time.monotonic()
    return b.infer(service, list(chunks), now, now + service.total_timeout * len(chunks))


def test_batcher_sends_what_waited_as_one_call_when_the_instance_frees() -> None:
    async def scenario() -> tuple[FakeTriton, list[Any]]:
        release = asyncio.Event()
        triton = FakeTriton(release)
        b, service = batcher(triton)
        first = asyncio.ensure_future(infer(b, service, rows(1)))
        await triton.started.wait()
        waiting = [asyncio.ensure_future(infer(b, service, rows(*values))) for values in ((2, 3), (4,), (5, 6))]
        await asyncio.sleep(0.01)
        assert len(triton.sent) == 1  # one call per instance: the others wait in the gateway
        release.set()
        return triton, [await first, *[await w for w in waiting]]

    triton, answers = run(scenario)
    # At most 4 rows a call, in arrival order: 2 + 1 rows (2 more would pass 4), then the last two.
    assert [sent.rows for sent in triton.sent] == [[1], [2, 3, 4], [5, 6]]
    assert [answer[0]["y"].reshape(-1).tolist() for answer in answers] == [[1], [2, 3], [4], [5, 6]]


def test_batcher_tells_triton_the_wall_clock_start_by_when_it_sends() -> None:
    async def scenario() -> FakeTriton:
        triton = FakeTriton()
        b, service = batcher(triton)
        before = time.time()
        await infer(b, service, rows(1))
        return triton, before

    triton, before = run(scenario)
    (sent,) = triton.sent
    assert sent.start_by_us is not None
    assert before + 0.2 - 0.05 <= sent.start_by_us / 1e6 <= before + 0.2 + 0.05
    assert sent.timeout == pytest.approx(0.7, abs=0.05)  # queue_timeout + inference_timeout


def test_batcher_refuses_with_503_at_queue_timeout_when_a_request_waits_behind_a_busy_instance() -> None:
    refusals: list[str] = []

    async def scenario() -> tuple[float, Any, FakeTriton]:
        triton = FakeTriton(release=asyncio.Event())  # the first call never ends
        b, service = batcher(triton, refusals)
        running = asyncio.ensure_future(infer(b, service, rows(1)))
        await triton.started.wait()
        started = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            await infer(b, service, rows(2))
        waited = time.monotonic() - started
        running.cancel()
        return waited, refused.value, triton

    waited, error, triton = run(scenario)
    assert 0.2 <= waited < 0.7  # at queue_timeout, not at queue_timeout + inference_timeout as before
    assert error.status == 503 and error.headers["Retry-After"] == "1"
    assert "queue_timeout" in error.message
    assert refusals == ["queue_timeout"]
    assert [sent.rows for sent in triton.sent] == [[1]]  # never sent


def test_batcher_refuses_at_once_and_sends_nothing_when_the_queue_is_full() -> None:
    refusals: list[str] = []

    async def scenario() -> tuple[float, Any, FakeTriton]:
        triton = FakeTriton(release=asyncio.Event())
        b, service = batcher(triton, refusals, max_queue_size=2, batch_size=1)
        callers = [asyncio.ensure_future(infer(b, service, rows(1)))]
        await triton.started.wait()
        callers += [asyncio.ensure_future(infer(b, service, rows(value))) for value in (2, 3)]
        await asyncio.sleep(0)
        started = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            await infer(b, service, rows(4))
        waited = time.monotonic() - started
        for caller in callers:
            caller.cancel()
        return waited, refused.value, triton

    waited, error, triton = run(scenario)
    assert [sent.rows for sent in triton.sent] == [[1]]
    assert waited < 0.1  # at once: no waiting for queue_timeout (0.2 s)
    assert "Retry-After" in error.headers and "at most 2" in error.message
    assert refusals == ["queue_full"]


def test_batcher_gives_a_big_request_one_budget_per_chunk_when_it_has_several() -> None:
    async def scenario() -> tuple[FakeTriton, list[Any]]:
        triton = FakeTriton()
        b, service = batcher(triton)
        return triton, await infer(b, service, rows(1, 2, 3, 4), rows(5, 6, 7, 8), rows(9))

    triton, answers = run(scenario)
    assert [sent.rows for sent in triton.sent] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    starts = [sent.start_by_us for sent in triton.sent]
    assert starts[1] - starts[0] == pytest.approx(1e6, rel=0.01)  # one total_timeout apart
    assert [a["y"].reshape(-1).tolist() for a in answers] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_batcher_never_sends_a_caller_that_leaves_while_it_waits() -> None:
    async def scenario() -> tuple[FakeTriton, Any, bool]:
        release = asyncio.Event()
        triton = FakeTriton(release)
        b, service = batcher(triton)
        first = asyncio.ensure_future(infer(b, service, rows(1)))
        await triton.started.wait()
        leaving = asyncio.ensure_future(infer(b, service, rows(2)))
        staying = asyncio.ensure_future(infer(b, service, rows(3)))
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the caller, which leaves the queue
        release.set()
        await first
        return triton, await staying, leaving.cancelled()

    triton, answer, left = run(scenario)
    assert left and [sent.rows for sent in triton.sent] == [[1], [3]]
    assert answer[0]["y"].reshape(-1).tolist() == [3]


def test_batcher_answers_the_caller_that_stays_when_another_leaves_during_the_call() -> None:
    async def scenario() -> tuple[FakeTriton, Any]:
        release = asyncio.Event()
        triton = FakeTriton(release)
        b, service = batcher(triton, batch_timeout=0.01)
        leaving = asyncio.ensure_future(infer(b, service, rows(1)))
        staying = asyncio.ensure_future(infer(b, service, rows(2, 3)))
        await triton.started.wait()
        leaving.cancel()
        await asyncio.sleep(0)
        release.set()
        return triton, await staying

    triton, answer = run(scenario)
    assert [sent.rows for sent in triton.sent] == [[1, 2, 3]]
    assert answer[0]["y"].reshape(-1).tolist() == [2, 3]  # its own rows, not the leaver's
    assert triton.cancelled_calls == 0


def test_batcher_cancels_the_triton_call_when_every_caller_leaves() -> None:
    async def scenario() -> tuple[FakeTriton, list[bool]]:
        triton = FakeTriton(release=asyncio.Event())  # never released: only a cancellation ends the call
        b, service = batcher(triton, batch_timeout=0.01)
        callers = [asyncio.ensure_future(infer(b, service, rows(i))) for i in range(2)]
        await triton.started.wait()
        for caller in callers:
            caller.cancel()
        await triton.cancelled.wait()
        await asyncio.gather(*callers, return_exceptions=True)
        return triton, [caller.cancelled() for caller in callers]

    triton, left = run(scenario)
    assert left == [True, True]
    assert len(triton.sent) == 1 and triton.cancelled_calls == 1


def test_batcher_gives_every_caller_the_failure_when_the_call_fails() -> None:
    refusal = Unavailable("svc is overloaded")

    async def scenario() -> tuple[FakeTriton, list[Any]]:
        triton = FakeTriton(failure=refusal)
        b, service = batcher(triton, batch_timeout=0.01)
        outcomes = await asyncio.gather(*(infer(b, service, rows(i)) for i in range(3)), return_exceptions=True)
        return triton, outcomes

    triton, outcomes = run(scenario)
    assert len(triton.sent) == 1
    assert outcomes == [refusal, refusal, refusal]


def test_batcher_refuses_on_arrival_when_the_measured_backlog_cannot_start_in_time() -> None:
    refusals: list[str] = []

    async def scenario() -> Any:
        release = asyncio.Event()
        triton = FakeTriton(release)
        b, service = batcher(triton, refusals, batch_size=1, max_queue_size=100)
        queue = b._services["svc"].queue  # teach it what a call costs: 0.1 s
        for _ in range(3):
            queue.cost.observe(1, 0.1)
        first = asyncio.ensure_future(infer(b, service, rows(0)))
        await triton.started.wait()
        backlog = [asyncio.ensure_future(infer(b, service, rows(i))) for i in (1, 2)]
        await asyncio.sleep(0)
        started = time.monotonic()
        with pytest.raises(GatewayError) as refused:
            await infer(b, service, rows(3))  # starts after 0.1 s of running and 0.2 s of waiting: past 0.2 s
        elapsed = time.monotonic() - started
        release.set()
        await asyncio.gather(first, *backlog)
        return refused.value, elapsed

    error, elapsed = run(scenario)
    assert error.status == 503 and elapsed < 0.1  # at once, not at queue_timeout (0.2 s)
    assert refusals == ["too_late"]
