"""The LLM service's scheduler: a waiting queue and one running batch, driven by one thread, as vLLM's engine does.

Triton's ``execute`` only ``submit``s (the request is tokenised, then queued or refused) and returns; this engine
decides when each request runs. At every step boundary it:

1. ends waiting requests that were cancelled, and refuses those past their start-by (``queue_timeout``, or the
   gateway's earlier deadline) with Triton's own "Request timeout expired";
2. admits waiting requests, oldest first, while fewer than ``batch_size`` run; when nothing runs, it may hold the
   first arrival up to ``batch_timeout`` to gather company (static batching: it admits only into an empty batch);
3. prefills the admitted rows and merges them into the running batch, then decodes one token for every row.

A request that finds ``max_queue_size`` waiting is refused at once ("Exceeds maximum queue size"). Running rows
end at EOS, a stop string, max_tokens, inference_timeout (counted from their join) or cancellation, and free their
slot for the next step. Every request gets exactly one final event, ``stop`` included.

Imports nothing from Triton: ``runtimes/llm_model.py`` adapts it, tests drive it directly.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from runtimes.llm import BatchGenerator, GenerationEvent, GenerationRequest, RunningBatch, _Row
from runtimes.signatures import QUEUE_FULL_MESSAGE, QUEUE_TIMEOUT_MESSAGE, UNLOADING_MESSAGE

# While requests wait for the batch_timeout hold, or nothing runs, the engine still wakes this often to see
# cancellations and queue timeouts (a running batch checks at every step).
_IDLE_TICK_S = 0.01


@dataclass(frozen=True)
class EngineLimits:
    """The service's knobs as the engine enforces them (seconds; 0 queue_timeout: none)."""

    batch_size: int  # sequences running at once
    batch_timeout_s: float  # when idle, how long the first arrival may wait for company
    max_queue_size: int  # requests waiting; one more is refused
    queue_timeout_s: float  # how long a request may wait to start
    # False: the LLM's scheduling before this engine, kept to compare against (python -m benchmarks.llm): Triton's
    # dynamic batcher started a batch only when the previous one had ended, and nothing enforced queue_timeout
    # (its queue policy had max_queue_size only), so here neither queue_timeout nor a start-by refuses anything.
    continuous: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_queue_size < 0:
            raise ValueError(f"batch_size must be >= 1 and max_queue_size >= 0, got {self}")
        if not (self.batch_timeout_s >= 0 and self.queue_timeout_s >= 0):
            raise ValueError(f"batch_timeout and queue_timeout must be >= 0, got {self}")


class EngineObserver(Protocol):
    """What the engine reports, from its own thread; an implementation must not block (Triton's metric calls are
    IPC: ``runtimes/llm_model.py`` hands them to its sender thread)."""

    def refused(self, reason: str) -> None: ...  # "queue_full" | "queue_timeout"

    def started(self, queue_wait_s: float) -> None: ...

    def first_text(self, seconds: float) -> None: ...  # arrival to the first piece of text

    def finished(self, event: GenerationEvent, seconds_per_token: float | None) -> None: ...


class _NoObserver:
    def refused(self, reason: str) -> None:
        pass

    def started(self, queue_wait_s: float) -> None:
        pass

    def first_text(self, seconds: float) -> None:
        pass

    def finished(self, event: GenerationEvent, seconds_per_token: float | None) -> None:
        pass


@dataclass(eq=False)
class _Waiting:
    row: _Row
    arrival: float
    start_by: float


@dataclass
class _Timing:
    arrival: float
    first_text: float | None = None


class Engine:
    """Schedules requests onto one ``RunningBatch``; ``emit`` receives every event, from the engine's thread (and
    from the submitting thread for an immediate refusal), so it must be thread-safe and quick."""

    def __init__(
        self,
        generator: BatchGenerator,
        limits: EngineLimits,
        emit: Callable[[GenerationEvent], None],
        *,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._generator = generator
        self._emit = emit
        self._observer = observer or _NoObserver()
        self._clock = clock
        self._batch = RunningBatch(generator)
        self._waiting: deque[_Waiting] = deque()
        self._timings: dict[int, _Timing] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self.peak_running = 0
        self.peak_waiting = 0  # high-water marks, for `sluice verify` and the dashboard: a sampled gauge misses peaks
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request_id: int, request: GenerationRequest, start_by: float | None = None) -> None:
        """Queues a request, or answers it at once: an unusable prompt, a full queue, a stopped engine.
        ``start_by`` (engine clock) may shorten its queue_timeout, never lengthen it."""
        now = self._clock()
        prepared = self._generator.prepare(request_id, request)
        if isinstance(prepared, GenerationEvent):
            self._emit(prepared)
            return
        queue_timeout = self.limits.queue_timeout_s or math.inf
        deadline = min(now + queue_timeout, math.inf if start_by is None else start_by)
        if not self.limits.continuous:
            deadline = math.inf
        with self._wake:
            if self._stopping:
                refusal = _refusal(prepared, UNLOADING_MESSAGE)
            elif len(self._waiting) >= self.limits.max_queue_size:
                refusal = _refusal(prepared, QUEUE_FULL_MESSAGE)
            else:
                self._waiting.append(_Waiting(prepared, now, deadline))
                self.peak_waiting = max(self.peak_waiting, len(self._waiting))
                self._timings[request_id] = _Timing(now)
                self._wake.notify()
                return
        if refusal.error == QUEUE_FULL_MESSAGE:
            self._observer.refused("queue_full")
        self._emit(refusal)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the engine thread and answers every open request (UNAVAILABLE, the model is unloading)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        with self._wake:
            waiting = [entry.row for entry in self._waiting]
            self._waiting.clear()
        for row in [*waiting, *self._batch.abort()]:
            self._emit(_refusal(row, UNLOADING_MESSAGE))
        self._timings.clear()

    # --- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                now = self._clock()
                ended = self._drop_waiting(now)
                admitted = self._admit(now)
                if not admitted and not self._batch and not ended:
                    self._wake.wait(self._idle_wait(now))
                    continue
            self._step(ended, admitted, now)

    def _step(self, ended: list[GenerationEvent], admitted: list[_Waiting], now: float) -> None:
        """One step boundary's work, in a frame of its own: nothing of a request stays referenced once it ends
        (its Triton response sender lives as long as its row does)."""
        self._publish(ended)
        for waited in admitted:
            self._observer.started(now - waited.arrival)
        try:
            self._publish(self._batch.join([waited.row for waited in admitted]))
            self.peak_running = max(self.peak_running, len(self._batch))
            self._publish(self._batch.step())
        # A failing step (a bug, out of memory) ends the rows it held, not the engine: the next ones may run.
        except Exception as exc:  # noqa: BLE001
            self._publish(
                GenerationEvent(row.index, error=f"generation failed: {exc}", code="internal")
                for row in self._batch.abort()
            )

    def _drop_waiting(self, now: float) -> list[GenerationEvent]:
        """Ends the waiting requests that were cancelled or can no longer start in time."""
        ended, kept = [], deque[_Waiting]()
        for entry in self._waiting:
            if entry.row.request.is_cancelled():
                ended.append(entry.row.event(finish_reason="cancelled"))
            elif now >= entry.start_by:
                ended.append(_refusal(entry.row, QUEUE_TIMEOUT_MESSAGE))
                self._observer.refused("queue_timeout")
            else:
                kept.append(entry)
        self._waiting = kept
        return ended

    def _admit(self, now: float) -> list[_Waiting]:
        """The waiting requests that join the batch at this step boundary, oldest first."""
        running, waiting, limits = len(self._batch), self._waiting, self.limits
        if not waiting or (running and not limits.continuous):
            return []
        if not running and len(waiting) < limits.batch_size and now < waiting[0].arrival + limits.batch_timeout_s:
            return []  # idle: hold the first arrival for company, up to batch_timeout
        return [waiting.popleft() for _ in range(min(limits.batch_size - running, len(waiting)))]

    def _idle_wait(self, now: float) -> float:
        if self._waiting and not self._batch:
            hold_ends = self._waiting[0].arrival + self.limits.batch_timeout_s
            return max(0.0, min(_IDLE_TICK_S, hold_ends - now))
        return _IDLE_TICK_S if self._waiting else 1.0

    def _publish(self, events: Iterable[GenerationEvent]) -> None:
        for event in events:
            self._account(event)
            self._emit(event)

    def _account(self, event: GenerationEvent) -> None:
        timing = self._timings.get(event.index)
        if timing is None:
            return
        now = self._clock()
        if event.text and timing.first_text is None:
            timing.first_text = now
            self._observer.first_text(now - timing.arrival)
        if event.final:
            del self._timings[event.index]
            if event.code == "unavailable" and event.error is not None:
                return  # refused or unloaded, never finished: counted by ``refused``
            per_token = None
            if timing.first_text is not None and event.completion_tokens > 1:
                per_token = (now - timing.first_text) / (event.completion_tokens - 1)
            self._observer.finished(event, per_token)


def _refusal(row: _Row, message: str) -> GenerationEvent:
    return GenerationEvent(row.index, prompt_tokens=len(row.prompt_ids), error=message, code="unavailable")
