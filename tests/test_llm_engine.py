"""The LLM engine (runtimes/llm_engine.py) driven in-process on the tiny Llama of tests/tiny_llm.py: continuous
batching, the five scheduling knobs it enforces, cancellation, stop; and the running batch's KV cache bound
(runtimes/llm.py). No Triton.

Events reach a thread-safe recorder; a request is "started" when its first event (its first token's text) comes,
which is the step its row joined at. Where an action must happen at a precise step (a request joining after the
long one's 5th token), the recorder runs it from the engine's own emit callback, so the test does not race the
decode loop; elsewhere each decode step is slowed by a few milliseconds so that timings have room."""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from runtimes.llm import BatchGenerator, GenerationEvent, GenerationRequest, RunningBatch
from runtimes.llm_engine import Engine, EngineLimits
from tests.tiny_llm import PROMPTS, Outcome, collect, greedy, run_alone, sharpen_attention, variant

QUEUE_FULL, QUEUE_TIMEOUT, UNLOADING = "Exceeds maximum queue size", "Request timeout expired", "the model is unloading"


@pytest.fixture(scope="module")
def engine_generator(generator: BatchGenerator) -> BatchGenerator:
    """A copy of the session's tiny model with room for long generations (its 256 positions) and sharp attention
    (``sharpen_attention``: a row misplaced by a merge or a trim then writes another text)."""
    model = copy.deepcopy(generator.model)
    sharpen_attention(model, 8)
    return BatchGenerator(model, generator.tokenizer, max_length=256, default_max_tokens=16)


@dataclass(frozen=True)
class Record:
    seq: int  # position in the order events were emitted
    at: float  # time.monotonic() at emit
    event: GenerationEvent
    running: int  # engine.running when it was emitted


@dataclass
class Observed:
    """An EngineObserver that keeps what it is told."""

    refusals: list[str] = field(default_factory=list)
    queue_waits: list[float] = field(default_factory=list)

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)

    def started(self, queue_wait_s: float) -> None:
        self.queue_waits.append(queue_wait_s)

    def first_text(self, seconds: float) -> None:
        pass

    def finished(self, event: GenerationEvent, seconds_per_token: float | None) -> None:
        pass


class Harness:
    """An engine and what it emitted. ``emit`` is thread-safe (a lock, and a queue.Queue the test waits on)."""

    def __init__(self, generator: BatchGenerator, limits: EngineLimits) -> None:
        self.observed = Observed()
        self.engine = Engine(generator, limits, self.emit, observer=self.observed)
        self.records: list[Record] = []
        self.submitted: dict[int, float] = {}
        self._lock = threading.Lock()
        self._finals: queue.Queue[int] = queue.Queue()
        self._seen_finals: set[int] = set()
        # (request, completion tokens, action): run from emit when that request's event reaches those tokens.
        self._triggers: list[tuple[int, int, Callable[[], None]]] = []

    def emit(self, event: GenerationEvent) -> None:
        with self._lock:
            self.records.append(Record(len(self.records), time.monotonic(), event, self.engine.running))
            due = [t for t in self._triggers if t[0] == event.index and event.completion_tokens >= t[1]]
            self._triggers = [t for t in self._triggers if t not in due]
        for _, _, action in due:
            action()
        if event.final:
            self._finals.put(event.index)

    def when(self, index: int, tokens: int, action: Callable[[], None]) -> None:
        """Runs ``action`` (on the engine's thread) once request ``index`` has ``tokens`` completion tokens."""
        with self._lock:
            self._triggers.append((index, tokens, action))

    def submit(self, index: int, request: GenerationRequest, start_by: float | None = None) -> None:
        self.submitted[index] = time.monotonic()
        self.engine.submit(index, request, start_by)

    def wait(self, *indices: int, timeout_s: float = 10.0) -> None:
        """Until each request got its final event."""
        deadline = time.monotonic() + timeout_s
        while not set(indices) <= self._seen_finals:
            try:
                self._seen_finals.add(self._finals.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no final event for {sorted(set(indices) - self._seen_finals)} in {timeout_s} s")

    def of(self, index: int) -> list[Record]:
        with self._lock:
            return [record for record in self.records if record.event.index == index]

    def first(self, index: int) -> Record:
        return self.of(index)[0]

    def final(self, index: int) -> Record:
        [final] = [record for record in self.of(index) if record.event.final]
        return final

    def outcome(self, index: int) -> Outcome:
        return collect(record.event for record in self.of(index))[index]


@contextlib.contextmanager
def running_engine(generator: BatchGenerator, **limits: Any) -> Iterator[Harness]:
    settings: dict[str, Any] = {"batch_size": 4, "batch_timeout_s": 0.0, "max_queue_size": 16,
                                "queue_timeout_s": 0.0} | limits
    harness = Harness(generator, EngineLimits(**settings))
    harness.engine.start()
    try:
        yield harness
    finally:
        harness.engine.stop()


@contextlib.contextmanager
def slow_steps(generator: BatchGenerator, seconds: float) -> Iterator[None]:
    """Every forward of the model (prefill or decode step) takes ``seconds`` longer."""
    handle = generator.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.001)


def cancellable(prompt: str, **kwargs: Any) -> tuple[GenerationRequest, threading.Event]:
    flag = threading.Event()
    return greedy(prompt, is_cancelled=flag.is_set, **kwargs), flag


def same_as_alone(harness: Harness, index: int, generator: BatchGenerator, request: GenerationRequest) -> None:
    alone, served = run_alone(generator, request), harness.outcome(index)
    assert served.text == alone.text, f"request {index}"
    assert alone.final is not None and served.final is not None
    expected = (alone.final.finish_reason, alone.final.prompt_tokens, alone.final.completion_tokens)
    assert (served.final.finish_reason, served.final.prompt_tokens, served.final.completion_tokens) == expected


# --- continuous batching ----------------------------------------------------------------------------------


def test_joining_requests_get_the_text_they_get_alone_when_they_join_mid_generation(
    engine_generator: BatchGenerator,
) -> None:
    # Prompts of 9, 32, 3 and 2 tokens, joining at different steps: the batch is padded on the left for the
    # long prompt, trimmed when it leaves, and merged again for the short ones.
    requests = {
        0: greedy(PROMPTS[0], max_tokens=40),
        1: greedy(PROMPTS[2], max_tokens=8),
        2: greedy(PROMPTS[1], max_tokens=20),
        3: greedy(PROMPTS[3], max_tokens=30),
    }
    with running_engine(engine_generator, batch_size=4) as harness:
        harness.when(0, 5, lambda: harness.submit(1, requests[1]))
        harness.when(0, 10, lambda: harness.submit(2, requests[2]))
        harness.when(1, 8, lambda: harness.submit(3, requests[3]))  # as request 1 leaves
        harness.submit(0, requests[0])
        harness.wait(0, 1, 2, 3)

    for index in (1, 2, 3):  # each joined while the first was running, after its first token
        first = harness.first(index)
        assert first.event.completion_tokens == 1 and first.running >= 2
        assert first.seq < harness.final(0).seq
    for index, request in requests.items():
        same_as_alone(harness, index, engine_generator, request)


def test_a_short_request_finishes_first_when_it_arrives_after_a_long_one_started(
    engine_generator: BatchGenerator,
) -> None:
    with running_engine(engine_generator, batch_size=2) as harness:
        harness.when(0, 3, lambda: harness.submit(1, greedy(PROMPTS[1], max_tokens=5)))
        harness.submit(0, greedy(PROMPTS[0], max_tokens=60))
        harness.wait(0, 1)
    long_final, short_first, short_final = harness.final(0), harness.first(1), harness.final(1)
    assert short_first.event.completion_tokens == 1 and short_first.running == 2  # it joined the running batch
    assert short_final.seq < long_final.seq
    assert (short_final.event.finish_reason, short_final.event.completion_tokens) == ("length", 5)
    assert (long_final.event.finish_reason, long_final.event.completion_tokens) == ("length", 60)


def test_a_short_request_waits_for_the_long_one_when_batching_is_static(engine_generator: BatchGenerator) -> None:
    with running_engine(engine_generator, batch_size=2, continuous=False) as harness:
        harness.when(0, 3, lambda: harness.submit(1, greedy(PROMPTS[1], max_tokens=5)))
        harness.submit(0, greedy(PROMPTS[0], max_tokens=60))
        harness.wait(0, 1)
    assert harness.first(1).seq > harness.final(0).seq  # it did not start until the long one ended
    assert harness.first(1).running == 1
    assert harness.final(1).event.completion_tokens == 5


# --- batch_size and max_queue_size ------------------------------------------------------------------------


def test_never_more_than_batch_size_run_when_flooded(engine_generator: BatchGenerator) -> None:
    requests = {i: greedy(PROMPTS[i % 4], max_tokens=8 + i) for i in range(12)}
    with running_engine(engine_generator, batch_size=3, max_queue_size=12) as harness:
        for index, request in requests.items():
            harness.submit(index, request)
        harness.wait(*requests)
        peak = harness.engine.peak_running
    assert max(record.running for record in harness.records) == 3
    assert peak == 3
    for index, request in requests.items():
        final = harness.final(index).event
        assert (final.finish_reason, final.completion_tokens) == ("length", request.max_tokens)


def test_the_request_past_a_full_queue_is_refused_at_once_when_batch_size_run_and_max_queue_size_wait(
    engine_generator: BatchGenerator,
) -> None:
    with slow_steps(engine_generator, 0.002), running_engine(engine_generator, batch_size=2, max_queue_size=3) as h:
        for index in range(2):
            h.submit(index, greedy(PROMPTS[index], max_tokens=200))
        wait_until(lambda: h.engine.running == 2)
        for index in range(2, 5):  # they wait: both slots are taken for a while (200 steps of over 2 ms)
            h.submit(index, greedy(PROMPTS[index % 4], max_tokens=3))
        assert h.engine.waiting == 3 and h.of(4) == []
        h.submit(5, greedy(PROMPTS[1], max_tokens=3))  # the batch_size + max_queue_size + 1-th
        refusal = h.of(5)  # emitted by submit itself, before it returned
        assert [r.event for r in refusal] == [
            GenerationEvent(5, prompt_tokens=refusal[0].event.prompt_tokens, error=QUEUE_FULL, code="unavailable")
        ]
        assert h.observed.refusals == ["queue_full"]
        h.wait(0, 1, 2, 3, 4, timeout_s=20)
    for index in range(2, 5):  # the ones that fitted in the queue were served
        assert h.final(index).event.finish_reason == "length"


# --- queue_timeout, start_by and batch_timeout ------------------------------------------------------------


def test_a_waiting_request_is_refused_at_its_queue_timeout_when_no_slot_frees(
    engine_generator: BatchGenerator,
) -> None:
    queue_timeout = 0.2
    with slow_steps(engine_generator, 0.002), running_engine(
        engine_generator, batch_size=1, queue_timeout_s=queue_timeout
    ) as harness:
        long, flag = cancellable(PROMPTS[0], max_tokens=240)  # at least 0.5 s
        harness.submit(0, long)
        wait_until(lambda: harness.engine.running == 1)
        harness.submit(1, greedy(PROMPTS[1], max_tokens=3))
        harness.wait(1)
        flag.set()
        harness.wait(0)
    [refusal] = harness.of(1)
    assert (refusal.event.error, refusal.event.code) == (QUEUE_TIMEOUT, "unavailable")
    waited = refusal.at - harness.submitted[1]
    assert queue_timeout <= waited <= queue_timeout + 0.05, waited
    assert harness.observed.refusals == ["queue_timeout"]
    assert harness.final(0).event.finish_reason == "cancelled"


def test_a_start_by_earlier_than_queue_timeout_refuses_the_request_earlier_when_given(
    engine_generator: BatchGenerator,
) -> None:
    with slow_steps(engine_generator, 0.002), running_engine(
        engine_generator, batch_size=1, queue_timeout_s=1.0
    ) as harness:
        long, flag = cancellable(PROMPTS[0], max_tokens=240)
        harness.submit(0, long)
        wait_until(lambda: harness.engine.running == 1)
        harness.submit(1, greedy(PROMPTS[1], max_tokens=3), start_by=time.monotonic() + 0.1)
        # A later start_by than queue_timeout does not lengthen it.
        harness.submit(2, greedy(PROMPTS[1], max_tokens=3), start_by=time.monotonic() + 60)
        harness.wait(1)
        flag.set()
        harness.wait(0, 2)
    [refusal] = harness.of(1)
    assert refusal.event.error == QUEUE_TIMEOUT
    waited = refusal.at - harness.submitted[1]
    assert 0.1 <= waited <= 0.15, waited
    assert harness.final(2).event.finish_reason == "length"  # it started when the long one was cancelled


def test_an_idle_engine_holds_the_first_arrival_for_company_until_batch_timeout(
    engine_generator: BatchGenerator,
) -> None:
    with running_engine(engine_generator, batch_size=2, batch_timeout_s=0.3) as harness:
        harness.submit(0, greedy(PROMPTS[0], max_tokens=5))
        time.sleep(0.1)
        harness.submit(1, greedy(PROMPTS[1], max_tokens=5))
        harness.wait(0, 1)
        harness.submit(2, greedy(PROMPTS[3], max_tokens=5))  # alone: nobody comes
        harness.wait(2)
    # The first two started together, when the second arrived (the batch was full): before batch_timeout.
    first, second = harness.first(0), harness.first(1)
    assert first.running == 2 and second.running == 2
    assert abs(second.seq - first.seq) == 1
    assert 0.1 <= first.at - harness.submitted[0] < 0.25
    # The lone one waited the whole batch_timeout.
    lone_wait = harness.first(2).at - harness.submitted[2]
    assert 0.3 <= lone_wait < 0.4, lone_wait


# --- cancellation -----------------------------------------------------------------------------------------


def test_a_cancelled_waiting_request_ends_cancelled_without_running_when_its_client_leaves(
    engine_generator: BatchGenerator,
) -> None:
    with slow_steps(engine_generator, 0.002), running_engine(engine_generator, batch_size=1) as harness:
        harness.submit(0, greedy(PROMPTS[0], max_tokens=150))
        wait_until(lambda: harness.engine.running == 1)
        waiting, flag = cancellable(PROMPTS[1], max_tokens=5)
        harness.submit(1, waiting)
        flag.set()
        harness.wait(0, 1)
    # Its only event is the final one: not a token was generated; and it ended while the other still ran.
    prompt_tokens = len(engine_generator.tokenizer(PROMPTS[1])["input_ids"])
    cancelled = GenerationEvent(1, finish_reason="cancelled", prompt_tokens=prompt_tokens)
    assert [record.event for record in harness.of(1)] == [cancelled]
    assert harness.final(1).seq < harness.final(0).seq
    assert len(harness.observed.queue_waits) == 1  # only the first request ever started


def test_a_cancelled_running_request_frees_its_slot_for_a_waiting_one_when_its_client_leaves(
    engine_generator: BatchGenerator,
) -> None:
    with slow_steps(engine_generator, 0.002), running_engine(engine_generator, batch_size=1) as harness:
        running, flag = cancellable(PROMPTS[0], max_tokens=200)
        harness.when(0, 3, flag.set)
        harness.submit(0, running)
        harness.submit(1, greedy(PROMPTS[1], max_tokens=5))
        harness.wait(0, 1)
    cancelled = harness.final(0)
    assert cancelled.event.finish_reason == "cancelled" and cancelled.event.completion_tokens == 3
    started = harness.first(1)
    # It started at the next step: its first token is the engine's next event, a few milliseconds later.
    assert started.seq == cancelled.seq + 1 and started.at - cancelled.at < 0.05
    assert harness.final(1).event.finish_reason == "length"


# --- inference_timeout and stop ---------------------------------------------------------------------------


def test_inference_timeout_counts_from_the_join_when_a_request_waited_longer_than_it(
    engine_generator: BatchGenerator,
) -> None:
    timed = variant(engine_generator, max_length=256, default_max_tokens=16, timeout_s=0.2)
    # Held 0.4 s for company (longer than timeout_s), then generates until 0.2 s after its join.
    with slow_steps(timed, 0.002), running_engine(timed, batch_size=2, batch_timeout_s=0.4) as harness:
        harness.submit(0, greedy(PROMPTS[0], max_tokens=240))
        harness.wait(0)
    outcome, final = harness.outcome(0), harness.final(0)
    assert outcome.pieces and final.event.finish_reason == "timeout"
    assert 0 < final.event.completion_tokens < 240
    started = harness.first(0).at - harness.submitted[0]
    assert started >= 0.4
    assert 0.2 <= final.at - harness.submitted[0] - 0.4 < 0.35


def test_stop_answers_every_waiting_and_running_request_unavailable_when_the_model_unloads(
    engine_generator: BatchGenerator,
) -> None:
    with slow_steps(engine_generator, 0.002):
        with running_engine(engine_generator, batch_size=2, max_queue_size=4) as harness:
            for index in range(4):
                harness.submit(index, greedy(PROMPTS[index], max_tokens=200))
            wait_until(lambda: harness.engine.running == 2)
            harness.engine.stop()
            thread_names = [thread.name for thread in threading.enumerate()]
            harness.submit(4, greedy(PROMPTS[1]))  # after stop: refused at once
            harness.wait(0, 1, 2, 3, 4, timeout_s=1)
    for index in range(5):
        records = harness.of(index)
        final = records[-1].event
        assert [r for r in records if r.event.final] == records[-1:]  # exactly one final, the last event
        assert (final.error, final.code) == (UNLOADING, "unavailable"), index
    assert len(harness.of(0)) > 1 and len(harness.of(2)) == 1  # running ones had streamed; waiting ones had not
    assert "llm-engine" not in thread_names


# --- the running batch's KV cache -------------------------------------------------------------------------


def test_the_kv_cache_stays_within_rows_times_max_length_when_rows_of_different_lengths_join_and_leave(
    engine_generator: BatchGenerator,
) -> None:
    short = variant(engine_generator, max_length=48, default_max_tokens=100)
    # Some rows run to the context's end (finish "length" at 48 tokens), others end early on max_tokens.
    arrivals = {
        0: [greedy(PROMPTS[2])],  # 32 prompt tokens: 16 to go
        3: [greedy(PROMPTS[1], max_tokens=5), greedy(PROMPTS[3])],
        9: [greedy(PROMPTS[0], max_tokens=20)],
        20: [greedy(PROMPTS[2], max_tokens=4), greedy(PROMPTS[1])],
        30: [greedy(PROMPTS[3], max_tokens=2)],
    }
    batch = RunningBatch(short)
    events: list[GenerationEvent] = []
    requests: list[GenerationRequest] = []
    longest: dict[int, int] = {}  # request -> the tokens its row holds in the cache (prompt + completion)

    def check() -> None:
        assert batch.tokens_held <= len(batch) * short.max_length
        # Exactly as wide as its longest live row: the padding no row needs is gone.
        live = [i for i in longest if not any(e.index == i and e.final for e in events)]
        assert len(live) == len(batch)
        assert batch.tokens_held == len(batch) * max((longest[i] for i in live), default=0)

    step = 0
    while step <= max(arrivals) or batch:
        rows = []
        for request in arrivals.get(step, []):
            row = short.prepare(len(requests), request)
            assert not isinstance(row, GenerationEvent)
            longest[row.index] = len(row.prompt_ids)
            requests.append(request)
            rows.append(row)
        events.extend(batch.join(rows))
        check()
        for event in batch.step():
            events.append(event)
            longest[event.index] = event.prompt_tokens + event.completion_tokens
        check()
        step += 1

    outcomes = collect(events)
    assert {outcome.final.finish_reason for outcome in outcomes.values() if outcome.final} == {"length"}
    assert any(o.final and o.final.prompt_tokens + o.final.completion_tokens == 48 for o in outcomes.values())
    for index, request in enumerate(requests):
        assert outcomes[index].text == run_alone(short, request).text
