"""One encoder service's waiting queue, owned by the gateway: what to refuse on arrival, what to send to Triton and
when, and what has waited past its queue budget. Pure: plain data and the clock passed in, no asyncio
(gateway/batcher.py drives it), so a unit test can run every decision without a model.

Why the gateway holds the queue rather than Triton: Triton 2.51 cannot keep queue_timeout. Its queue policy checks
timeouts every 500 ms while its instances are busy, and with a default timeout it strands the last request of a
burst (docs/triton-notes.md). Work that waits in Triton also cannot be refused before it runs. So the gateway sends a
service at most one call per model instance (``slots``): whatever Triton receives starts at once, and every request
waits here, where its deadline is a timer and the refusal is a 503 at the moment the budget ends.

The decisions, each made at one point:

- **admit**: refuse a request on arrival when its chunks would overflow ``max_queue_size`` (chunks waiting), or when
  the queue ahead of it cannot drain before its start-by (its queue budget) or its total deadline. The drain time
  comes from ``BatchCost``, fitted to the calls this service really made (a call stopped before its answer, at its
  inference_timeout or because its callers left, is only a lower bound on its cost: see ``finished``). Nothing is
  queued just to expire.
- **next_call**: when a slot is free, take waiting chunks in order of start-by (earliest deadline first; for
  single-chunk requests that is arrival order) up to ``batch_size`` rows. A batch that is not full is held until
  the oldest of its chunks has waited ``batch_timeout``, as Triton's dynamic batcher would hold it.
- **expire**: a chunk still waiting at its start-by is taken out and refused.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

WAITING, SENT, GONE = "waiting", "sent", "gone"


@dataclass(eq=False)
class Chunk:
    """At most ``batch_size`` rows of one request, sent to Triton in one call (possibly with other chunks)."""

    rows: int
    start_by: float  # the moment its call must be sent by (its queue budget ends)
    finish_by: float  # the request's total deadline
    payload: Any = None  # the driver's: inputs and the caller's future
    later: bool = False  # a second or later chunk of its request (see ServiceQueue.admit)
    enqueued: float = 0.0
    state: str = WAITING
    seq: int = 0


@dataclass(frozen=True)
class Refusal:
    reason: str  # "queue_full" | "too_late"
    message: str
    retry_after: float  # seconds after which the backlog ahead will have drained


class BatchCost:
    """Seconds a call of ``rows`` rows takes, fitted as ``fixed + per_row * rows`` by exponentially weighted least
    squares over the calls seen: a per-row average alone would charge a full batch the fixed cost of every row of a
    small one, and refuse too much at the start of a burst."""

    def __init__(self, weight: float = 0.1) -> None:
        self._weight = weight
        self._n = 0.0
        self._rows = self._seconds = self._rows2 = self._rows_seconds = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        w = self._weight if self._n else 1.0
        self._n += 1
        self._rows += w * (rows - self._rows)
        self._seconds += w * (seconds - self._seconds)
        self._rows2 += w * (rows * rows - self._rows2)
        self._rows_seconds += w * (rows * seconds - self._rows_seconds)

    def seconds(self, rows: int) -> float | None:
        """The expected duration of a call of ``rows`` rows; None before any call was seen."""
        if not self._n:
            return None
        variance = self._rows2 - self._rows**2
        if variance < 1e-9 or self._rows <= 0:  # every call had the same size: scale the mean
            per_row = self._seconds / max(self._rows, 1.0)
            return per_row * rows
        per_row = max(0.0, (self._rows_seconds - self._rows * self._seconds) / variance)
        fixed = max(0.0, self._seconds - per_row * self._rows)
        return fixed + per_row * rows


@dataclass
class _Running:
    started: float
    rows: int


@dataclass
class ServiceQueue:
    batch_size: int  # rows a call may carry
    max_queue_size: int  # chunks that may wait
    slots: int  # calls in flight at once: one per model instance
    batch_timeout: float  # how long a batch that is not full is held for company
    cost: BatchCost = field(default_factory=BatchCost)
    waiting_chunks: int = 0
    waiting_rows: int = 0
    _heap: list[tuple[float, int, Chunk]] = field(default_factory=list)
    _later: list[Chunk] = field(default_factory=list)  # waiting chunks a later arrival may overtake
    _running: dict[int, _Running] = field(default_factory=dict)
    _seq: int = 0
    _calls: int = 0

    # ---- arrival -------------------------------------------------------------------------------------------------

    def admit(self, now: float, chunks: Sequence[Chunk]) -> Refusal | None:
        """None when ``chunks`` (one request's, in order) can be queued and started in time; else why not."""
        if self.waiting_chunks + len(chunks) > self.max_queue_size:
            return Refusal(
                "queue_full",
                f"{self.waiting_chunks} requests wait for this service, at most {self.max_queue_size} may",
                self._drain(now, self.waiting_rows) - now,
            )
        first, rows = chunks[0], sum(chunk.rows for chunk in chunks)
        # Chunks ahead of the first: those that start earlier. Only later chunks of big requests can start after
        # a new arrival, so only they are looked at.
        ahead = self.waiting_rows - sum(c.rows for c in self._later if c.start_by > first.start_by)
        start = self._drain(now, ahead)
        full = self.cost.seconds(self.batch_size)
        if full is None:
            return None  # nothing measured yet: nothing to predict with
        if not self._running and not self.waiting_chunks and rows <= self.batch_size:
            # Idle: one batch always goes, whatever the estimate says. Only a call can correct an estimate gone stale
            # (one slow call after a Triton restart once had it refuse everything for 54 s, sending nothing).
            return None
        batches = math.ceil(rows / self.batch_size)
        finish = start + full * max(1.0, batches / self.slots)
        if start > first.start_by or finish > chunks[-1].finish_by:
            return Refusal(
                "too_late",
                f"the requests ahead take {start - now:.3g} s to start; this one would not finish in time",
                start - now,
            )
        return None

    def add(self, now: float, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            chunk.enqueued, chunk.seq, chunk.state = now, self._seq, WAITING
            self._seq += 1
            heapq.heappush(self._heap, (chunk.start_by, chunk.seq, chunk))
            if chunk.later:
                self._later.append(chunk)
        self.waiting_chunks += len(chunks)
        self.waiting_rows += sum(chunk.rows for chunk in chunks)

    def remove(self, chunk: Chunk) -> None:
        """Its caller left: a waiting chunk is never sent."""
        if chunk.state == WAITING:
            self._forget(chunk)
        chunk.state = GONE

    # ---- the clock ---------------------------------------------------------------------------------------------------

    def expire(self, now: float) -> list[Chunk]:
        """The chunks whose start-by has passed while they waited: taken out, for the driver to refuse."""
        expired = []
        while self._heap and (self._heap[0][2].state != WAITING or self._heap[0][0] <= now):
            chunk = heapq.heappop(self._heap)[2]
            if chunk.state == WAITING:
                self._forget(chunk)
                chunk.state = GONE
                expired.append(chunk)
        return expired

    def next_call(self, now: float) -> tuple[int, list[Chunk]] | None:
        """A call to send now (its key for ``finished``, its chunks), or None: no slot free, nothing waiting, or a
        batch held for company (``wake_at`` says until when)."""
        if len(self._running) >= self.slots or self._top() is None or self._holding(now):
            return None
        batch: list[Chunk] = []
        rows = 0
        while (top := self._top()) is not None and rows + top.rows <= self.batch_size:
            heapq.heappop(self._heap)
            self._forget(top)
            top.state = SENT
            batch.append(top)
            rows += top.rows
        if not batch:  # a chunk larger than batch_size cannot happen (the driver splits), but never spin
            return None
        self._calls += 1
        self._running[self._calls] = _Running(now, rows)
        return self._calls, batch

    def finished(self, key: int, now: float, measured: bool, *, stopped: bool = False) -> None:
        """The call ``key`` ended. ``measured``: it ran to its answer, so its duration is what the call cost.
        ``stopped``: it ended before its answer because it ran out of time (its inference_timeout, the call's timeout)
        or its callers left, so its duration is only a lower bound on its cost: it is fed to the fit only when the fit
        predicts less (then the truth is at least that much), never as the cost itself (a batch stopped at 0.3 s
        would teach that full batches take 0.3 s, and one cancelled at once that they are free).
        Neither: it was refused without being computed (a start-by passed, bad input), and says nothing."""
        running = self._running.pop(key)
        seconds = now - running.started
        if measured:
            self.cost.observe(running.rows, seconds)
        elif stopped:
            predicted = self.cost.seconds(running.rows)
            if predicted is None or predicted < seconds:
                self.cost.observe(running.rows, seconds)

    def wake_at(self, now: float) -> float | None:
        """When the driver must look again without an arrival or an answer: the next start-by, or the end of a hold."""
        top = self._top()
        if top is None:
            return None
        wake = top.start_by
        if len(self._running) < self.slots and self._holding(now):
            wake = min(wake, top.enqueued + self.batch_timeout)
        return wake

    # ---- internals ----------------------------------------------------------------------------------------------

    def _top(self) -> Chunk | None:
        while self._heap and self._heap[0][2].state != WAITING:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def _holding(self, now: float) -> bool:
        top = self._top()
        return top is not None and self.waiting_rows < self.batch_size and now < top.enqueued + self.batch_timeout

    def _forget(self, chunk: Chunk) -> None:
        self.waiting_chunks -= 1
        self.waiting_rows -= chunk.rows
        if chunk.later:
            self._later.remove(chunk)

    def _drain(self, now: float, rows_ahead: int) -> float:
        """When a chunk behind ``rows_ahead`` waiting rows is predicted to start: batches of ``batch_size`` rows go
        to the slots as they free, each taking what ``cost`` says a full batch takes."""
        full = self.cost.seconds(self.batch_size)
        if full is None:
            return now
        free = sorted(self._free_times(now, full))
        batches_ahead = rows_ahead // self.batch_size
        return free[batches_ahead % self.slots] + (batches_ahead // self.slots) * full

    def _free_times(self, now: float, full: float) -> Iterator[float]:
        for running in self._running.values():
            expected = self.cost.seconds(running.rows) or full
            yield max(now, running.started + expected)
        for _ in range(self.slots - len(self._running)):
            yield now
