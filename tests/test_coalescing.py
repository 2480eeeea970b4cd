"""The coalescer (gateway/coalescing.py) against a fake Triton: what each caller receives, and what Triton is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from gateway.coalescing import Coalescer
from gateway.errors import Unavailable

Result = TypeVar("Result")


@dataclass(frozen=True)
class Sent:
    """One request the fake Triton received."""

    service: str
    rows: list[int]  # the values of input "x", one a row
    outputs: tuple[str, ...]
    timeout: float


class FakeTriton:
    """``Triton.infer`` as the coalescer calls it: answers each output with the rows of input ``x`` (so each caller
    can tell its own rows); holds every call until ``release`` is set, when given one; raises ``failure``, when
    given one. Records what it was sent and whether a call was cancelled while it waited."""

    def __init__(self, release: asyncio.Event | None = None, failure: Exception | None = None) -> None:
        self.release = release
        self.failure = failure
        self.sent: list[Sent] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cancelled_calls = 0

    async def infer(self, service: str, inputs: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str],
                    timeout: float) -> dict[str, npt.NDArray[Any]]:
        self.sent.append(Sent(service, inputs["x"].reshape(-1).tolist(), tuple(outputs), timeout))
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


def test_coalescer_sends_one_loop_turns_callers_as_calls_of_at_most_max_rows_when_concurrent() -> None:
    batches = [rows(*range(10 * i, 10 * i + n)) for i, n in enumerate((3, 1, 2, 1, 1))]
    merges: list[tuple[str, int]] = []

    async def scenario() -> tuple[FakeTriton, list[dict[str, Any]]]:
        triton = FakeTriton()
        coalescer = Coalescer(triton, on_call=lambda service, callers: merges.append((service, callers)))
        answers = await asyncio.gather(*(coalescer.infer("svc", x, ("y",), 5, max_rows=4) for x in batches))
        return triton, answers

    triton, answers = run(scenario)
    # In arrival order, at most 4 rows a call: 3 + 1, then 2 + 1 + 1.
    assert [sent.rows for sent in triton.sent] == [[0, 1, 2, 10], [20, 21, 30, 40]]
    assert merges == [("svc", 2), ("svc", 3)]
    for batch, answer in zip(batches, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], batch["x"])


def test_coalescer_sends_callers_apart_when_service_outputs_or_row_limit_differ() -> None:
    async def scenario() -> tuple[FakeTriton, list[dict[str, Any]]]:
        triton = FakeTriton()
        coalescer = Coalescer(triton)
        answers = await asyncio.gather(
            coalescer.infer("a", rows(1), ("y",), 5, max_rows=4),
            coalescer.infer("b", rows(2), ("y",), 5, max_rows=4),
            coalescer.infer("a", rows(3), ("y", "z"), 5, max_rows=4),
            coalescer.infer("a", rows(4), ("y",), 5, max_rows=8),
            coalescer.infer("a", rows(5), ("y",), 5, max_rows=4),  # joins the first
        )
        return triton, answers

    triton, answers = run(scenario)
    assert sorted((sent.service, sent.outputs, sent.rows) for sent in triton.sent) == [
        ("a", ("y",), [1, 5]), ("a", ("y",), [4]), ("a", ("y", "z"), [3]), ("b", ("y",), [2]),
    ]
    assert [answer["y"].reshape(-1).tolist() for answer in answers] == [[1], [2], [3], [4], [5]]


def test_coalescer_sends_a_later_caller_in_a_call_of_its_own_when_it_arrives_after_the_dispatch() -> None:
    async def scenario() -> FakeTriton:
        triton = FakeTriton()
        coalescer = Coalescer(triton)
        await coalescer.infer("svc", rows(1), ("y",), 5, max_rows=4)
        await coalescer.infer("svc", rows(2), ("y",), 5, max_rows=4)
        return triton

    assert [sent.rows for sent in run(scenario).sent] == [[1], [2]]


def test_coalescer_gives_the_merged_call_the_longest_timeout_when_callers_differ() -> None:
    async def scenario() -> FakeTriton:
        triton = FakeTriton()
        coalescer = Coalescer(triton)
        await asyncio.gather(*(coalescer.infer("svc", rows(i), ("y",), timeout, max_rows=4)
                               for i, timeout in enumerate((1.0, 3.0, 2.0))))
        return triton

    assert [sent.timeout for sent in run(scenario).sent] == [3.0]


def test_coalescer_never_sends_a_caller_that_leaves_before_the_dispatch() -> None:
    async def scenario() -> tuple[FakeTriton, dict[str, Any], bool]:
        triton = FakeTriton()
        coalescer = Coalescer(triton)
        leaving = asyncio.ensure_future(coalescer.infer("svc", rows(1), ("y",), 5, max_rows=4))
        staying = asyncio.ensure_future(coalescer.infer("svc", rows(2), ("y",), 5, max_rows=4))
        await asyncio.sleep(0)  # both wait in this loop turn's merge
        leaving.cancel()
        answer = await staying
        return triton, answer, leaving.cancelled()

    triton, answer, left = run(scenario)
    assert left and [sent.rows for sent in triton.sent] == [[2]]
    assert answer["y"].reshape(-1).tolist() == [2]


def test_coalescer_answers_the_caller_that_stays_when_another_leaves_during_the_call() -> None:
    async def scenario() -> tuple[FakeTriton, dict[str, Any]]:
        release = asyncio.Event()
        triton = FakeTriton(release)
        coalescer = Coalescer(triton)
        leaving = asyncio.ensure_future(coalescer.infer("svc", rows(1), ("y",), 5, max_rows=4))
        staying = asyncio.ensure_future(coalescer.infer("svc", rows(2, 3), ("y",), 5, max_rows=4))
        await triton.started.wait()
        leaving.cancel()
        await asyncio.sleep(0)
        release.set()
        return triton, await staying

    triton, answer = run(scenario)
    assert [sent.rows for sent in triton.sent] == [[1, 2, 3]]
    assert answer["y"].reshape(-1).tolist() == [2, 3]  # its own rows, not the leaver's
    assert triton.cancelled_calls == 0


def test_coalescer_cancels_the_triton_call_when_every_caller_leaves() -> None:
    async def scenario() -> tuple[FakeTriton, list[bool]]:
        triton = FakeTriton(release=asyncio.Event())  # never released: only a cancellation ends the call
        coalescer = Coalescer(triton)
        callers = [asyncio.ensure_future(coalescer.infer("svc", rows(i), ("y",), 5, max_rows=4)) for i in range(2)]
        await triton.started.wait()
        for caller in callers:
            caller.cancel()
        await triton.cancelled.wait()
        await asyncio.gather(*callers, return_exceptions=True)
        return triton, [caller.cancelled() for caller in callers]

    triton, left = run(scenario)
    assert left == [True, True]
    assert len(triton.sent) == 1 and triton.cancelled_calls == 1


def test_coalescer_gives_every_caller_the_failure_when_the_merged_call_fails() -> None:
    refusal = Unavailable("svc is overloaded")

    async def scenario() -> tuple[FakeTriton, list[Any]]:
        triton = FakeTriton(failure=refusal)
        coalescer = Coalescer(triton)
        outcomes = await asyncio.gather(*(coalescer.infer("svc", rows(i), ("y",), 5, max_rows=4) for i in range(3)),
                                        return_exceptions=True)
        return triton, outcomes

    triton, outcomes = run(scenario)
    assert len(triton.sent) == 1
    assert outcomes == [refusal, refusal, refusal]


def test_coalescer_gives_the_failure_to_the_callers_that_stay_when_one_left_before_it() -> None:
    refusal = Unavailable("refused")

    async def scenario() -> tuple[bool, list[Any]]:
        release = asyncio.Event()
        coalescer = Coalescer(triton := FakeTriton(release, failure=refusal))
        leaving = asyncio.ensure_future(coalescer.infer("svc", rows(1), ("y",), 5, max_rows=4))
        staying = [asyncio.ensure_future(coalescer.infer("svc", rows(i), ("y",), 5, max_rows=4)) for i in (2, 3)]
        await triton.started.wait()
        leaving.cancel()
        await asyncio.sleep(0)
        release.set()
        return leaving.cancelled(), await asyncio.gather(*staying, return_exceptions=True)

    left, outcomes = run(scenario)
    assert left and outcomes == [refusal, refusal]
