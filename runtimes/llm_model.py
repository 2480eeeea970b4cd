"""Triton Python-backend model of an LLM service; the compiler copies it to ``<service>/1/model.py``.

The model is decoupled: each request gets a stream of responses, one per piece of text, and a last one with
flag FINAL carrying the finish reason (tensor contract: ``LLM_INPUTS`` / ``LLM_OUTPUTS`` in
``runtimes/signatures.py``), or a single error response with FINAL.

``execute`` reads each request's inputs, hands it to the engine (``runtimes/llm_engine.py``, continuous batching
with its own queue) and returns at once. Everything that talks back to Triton (sends, cancellation checks, metrics:
each one an IPC round trip to the parent process) happens on one sender thread, so the decode loop never waits
on them and each request's responses leave in order. When the sender falls behind, the text pieces of one request
waiting to be sent go out as one response.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from runtimes._triton import error_response, gpu_device_id, model_parameters, request_value, start_by_us, version_dir
from runtimes.llm import GenerationEvent, GenerationRequest, check_mergeable, load_generator
from runtimes.llm_engine import Engine, EngineLimits
from runtimes.signatures import (
    COMPLETION_TOKENS,
    FINISH_REASON,
    MAX_TOKENS,
    MESSAGES,
    PROMPT_TOKENS,
    SEED,
    STOP,
    TEMPERATURE,
    TEXT_INPUT,
    TEXT_OUTPUT,
    TOP_P,
)

# Benchmarks only (python -m benchmarks.llm): "static" schedules as Triton's dynamic batcher did before the engine
# (a batch starts when the previous one has ended; no queue_timeout), to compare the two in one run.
SCHEDULING_ENV = "SLUICE_LLM_SCHEDULING"
# How often the sender thread asks Triton whether open requests were cancelled, and refreshes the gauges.
POLL_S = 0.1
FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")
REFUSALS = ("queue_full", "queue_timeout")
# Seconds; queue waits and time to first token go from milliseconds to a few seconds, time per token much lower.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
TOKEN_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]


def _json_list(request: Any, name: str) -> list[Any] | None:
    text = request_value(request, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"input {name!r} must be a JSON list: {exc}") from exc
    if not isinstance(value, list):
        raise ValueError(f"input {name!r} must be a JSON list, got {type(value).__name__}")
    return value


def parse_request(request: Any, is_cancelled: Callable[[], bool]) -> GenerationRequest:
    """Reads one Triton request's inputs; a ValueError names the input that is wrong."""
    optional = {name: request_value(request, name) for name in (MAX_TOKENS, TEMPERATURE, TOP_P, SEED)}
    present = {name: value for name, value in optional.items() if value is not None}
    return GenerationRequest(
        text_input=request_value(request, TEXT_INPUT),
        messages=_json_list(request, MESSAGES),
        stop=tuple(_json_list(request, STOP) or ()),
        is_cancelled=is_cancelled,
        **present,
    )


def _string_tensor(name: str, text: str) -> Any:
    return pb_utils.Tensor(name, np.array([[text.encode("utf-8")]], dtype=np.object_))


def event_response(event: GenerationEvent) -> Any:
    """One InferenceResponse: an error, or the four LLM_OUTPUTS shaped [1, 1]."""
    if event.error is not None:
        if event.code == "unavailable":
            error = pb_utils.TritonError(event.error, pb_utils.TritonError.UNAVAILABLE)
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        return error_response(event.error, internal=event.code == "internal")
    return pb_utils.InferenceResponse(
        output_tensors=[
            _string_tensor(TEXT_OUTPUT, event.text),
            _string_tensor(FINISH_REASON, event.finish_reason or ""),
            pb_utils.Tensor(PROMPT_TOKENS, np.array([[event.prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor(COMPLETION_TOKENS, np.array([[event.completion_tokens]], dtype=np.int32)),
        ]
    )


class _Client:
    """One request's response sender. ``cancelled`` is what the engine reads (a plain flag: the sender thread
    refreshes it from Triton); a send that fails (the client went away) sets it too."""

    def __init__(self, sender: Any) -> None:
        self.sender = sender
        self.cancelled = False

    def is_cancelled(self) -> bool:
        return self.cancelled


def _coalesce(events: list[GenerationEvent]) -> list[GenerationEvent]:
    """Consecutive text pieces of one request become one piece (the last one's token counts); finals stay apart."""
    merged: list[GenerationEvent] = []
    pending: dict[int, int] = {}  # request -> position of its text piece in ``merged`` still open to merging
    for event in events:
        at = pending.get(event.index)
        if at is not None and not event.final:
            previous = merged[at]
            merged[at] = GenerationEvent(
                event.index, previous.text + event.text, None, event.prompt_tokens, event.completion_tokens
            )
            continue
        merged.append(event)
        if event.final:
            pending.pop(event.index, None)
        else:
            pending[event.index] = len(merged) - 1
    return merged


class _Metrics:
    """The engine's figures on Triton's own /metrics (Python-backend custom metrics; Triton's queue and compute
    metrics see only ``execute``, which returns at once). Called from the sender thread only."""

    def __init__(self, model_name: str) -> None:
        labels = {"model": model_name}

        def family(name: str, description: str, kind: Any) -> Any:
            created = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(created)  # a family must outlive its metrics, or Triton drops their values
            return created

        self._families: list[Any] = []
        counter, gauge, histogram = (
            pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.HISTOGRAM
        )
        finished = family("sluice_llm_requests_finished_total", "LLM requests ended, by finish reason", counter)
        self.finished = {reason: finished.Metric(labels=labels | {"reason": reason}) for reason in FINISH_REASONS}
        self.tokens = family("sluice_llm_completion_tokens_total", "Tokens generated by the LLM", counter).Metric(
            labels=labels
        )
        refused = family(
            "sluice_llm_refused_total", "LLM requests refused by the engine's queue, by reason", counter
        )
        self.refused = {reason: refused.Metric(labels=labels | {"reason": reason}) for reason in REFUSALS}
        self.running = family("sluice_llm_running", "Sequences in the running batch", gauge).Metric(labels=labels)
        self.waiting = family("sluice_llm_waiting", "Requests waiting to start", gauge).Metric(labels=labels)
        self.peak = family(
            "sluice_llm_running_peak", "The largest running batch since the model loaded", gauge
        ).Metric(labels=labels)
        self.peak_waiting = family(
            "sluice_llm_waiting_peak", "The most requests waiting to start since the model loaded", gauge
        ).Metric(labels=labels)

        def seconds(name: str, description: str, buckets: list[float]) -> Any:
            return family(name, description, histogram).Metric(labels=labels, buckets=buckets)

        self.queue_wait = seconds(
            "sluice_llm_queue_wait_seconds", "Arrival at the engine to joining the running batch", LATENCY_BUCKETS
        )
        self.first_text = seconds(
            "sluice_llm_time_to_first_token_seconds", "Arrival at the engine to the first piece of text",
            LATENCY_BUCKETS,
        )
        self.per_token = seconds(
            "sluice_llm_time_per_output_token_seconds", "Mean time between a request's tokens after the first",
            TOKEN_BUCKETS,
        )

    def gauges(self, engine: Engine) -> None:
        self.running.set(engine.running)
        self.waiting.set(engine.waiting)
        self.peak.set(engine.peak_running)
        self.peak_waiting.set(engine.peak_waiting)

    def finish(self, event: GenerationEvent, seconds_per_token: float | None) -> None:
        self.finished[event.finish_reason or "error"].increment(1)
        if event.completion_tokens:
            self.tokens.increment(event.completion_tokens)
        if seconds_per_token is not None:
            self.per_token.observe(seconds_per_token)


class _Observer:
    """The engine's reports, turned into metric updates the sender thread runs (never IPC on the engine's)."""

    def __init__(self, post: Callable[[Callable[[_Metrics], None]], None]) -> None:
        self._post = post

    def refused(self, reason: str) -> None:
        self._post(lambda metrics: metrics.refused[reason].increment(1))

    def started(self, queue_wait_s: float) -> None:
        self._post(lambda metrics: metrics.queue_wait.observe(queue_wait_s))

    def first_text(self, seconds: float) -> None:
        self._post(lambda metrics: metrics.first_text.observe(seconds))

    def finished(self, event: GenerationEvent, seconds_per_token: float | None) -> None:
        self._post(lambda metrics: metrics.finish(event, seconds_per_token))


class _Sender:
    """The one thread that talks to Triton after ``execute``: it sends the engine's events in order, polls open
    requests for cancellation every POLL_S, and applies metric updates."""

    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics
        self._inbox: queue.SimpleQueue[GenerationEvent | Callable[[_Metrics], None] | None] = queue.SimpleQueue()
        self._clients: dict[int, _Client] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._engine: Engine | None = None
        self._thread = threading.Thread(target=self._run, name="llm-sender", daemon=True)

    def start(self, engine: Engine) -> None:
        self._engine = engine
        self._thread.start()

    def open(self, sender: Any) -> tuple[int, _Client]:
        with self._lock:
            self._next_id += 1
            client = self._clients[self._next_id] = _Client(sender)
            return self._next_id, client

    def post(self, item: GenerationEvent | Callable[[_Metrics], None]) -> None:
        self._inbox.put(item)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Sends what is queued, then ends the thread."""
        self._inbox.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        next_poll = time.monotonic() + POLL_S
        while True:
            try:
                items = [self._inbox.get(timeout=max(0.0, next_poll - time.monotonic()))]
            except queue.Empty:
                items = []
            while not self._inbox.empty():  # everything already queued goes out in this round
                items.append(self._inbox.get_nowait())
            events = [item for item in items if isinstance(item, GenerationEvent)]
            for event in _coalesce(events):
                self._send(event)
            for item in items:
                if item is not None and not isinstance(item, GenerationEvent):
                    item(self._metrics)
            if None in items:
                return
            if time.monotonic() >= next_poll:
                self._poll()
                next_poll = time.monotonic() + POLL_S

    def _send(self, event: GenerationEvent) -> None:
        with self._lock:
            client = self._clients.pop(event.index, None) if event.final else self._clients.get(event.index)
        if client is None:
            return  # its stream already ended
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if event.final else 0
        try:
            client.sender.send(event_response(event), flags=flags)
        # Whatever the backend raises here concerns this client only; logged, and the engine drops the request.
        except Exception as exc:  # noqa: BLE001
            client.cancelled = True
            pb_utils.Logger.log_warn(f"llm: could not send a response, dropping the request: {exc}")

    def _poll(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            if not client.cancelled and client.sender.is_cancelled():
                client.cancelled = True
        if self._engine is not None:
            self._metrics.gauges(self._engine)


def _limits(parameters: Any) -> EngineLimits:
    scheduling = os.environ.get(SCHEDULING_ENV, "continuous")
    if scheduling not in ("continuous", "static"):
        raise ValueError(f"{SCHEDULING_ENV} must be continuous or static, got {scheduling!r}")
    return EngineLimits(
        batch_size=parameters.batch_size,
        batch_timeout_s=parameters.batch_timeout_us / 1e6,
        max_queue_size=parameters.max_queue_size,
        queue_timeout_s=parameters.queue_timeout_us / 1e6,
        continuous=scheduling == "continuous",
    )


class TritonPythonModel:
    """Triton's entry points: load the model and start the engine; queue each request; stop cleanly."""

    def initialize(self, args: Mapping[str, str]) -> None:
        parameters = model_parameters(args, llm=True)
        assert parameters.default_max_tokens is not None  # required by llm=True
        device_id = gpu_device_id(args)
        device = "cpu" if device_id is None else f"cuda:{device_id}"
        # One core is left to the sender thread, Triton and the gateway: with every core given to torch, its idle
        # OpenMP threads spin against them, and on 2 cores the tiny demo model streamed 1,671 tokens/s at 4 streams
        # with TTFT p99 212 ms, against 2,481 and 25 ms with one thread (python -m benchmarks.llm).
        threads = parameters.threads(os.cpu_count(), spare_cores=1)
        generator = load_generator(
            version_dir(args) / parameters.artifacts_dir,
            threads=threads,
            device=device,
            max_length=parameters.max_length,
            default_max_tokens=parameters.default_max_tokens,
            timeout_s=parameters.inference_timeout_s,
        )
        check_mergeable(generator.model)
        limits = _limits(parameters)
        self._sender = _Sender(_Metrics(args["model_name"]))
        self._engine = Engine(generator, limits, self._sender.post, observer=_Observer(self._sender.post))
        self._sender.start(self._engine)
        self._engine.start()
        pb_utils.Logger.log_info(
            f"llm: loaded {parameters.artifacts_dir} on {device} with {threads} intra-op threads; "
            f"{'continuous' if limits.continuous else 'static'} batching of up to {limits.batch_size} sequences"
        )

    def execute(self, requests: Sequence[Any]) -> None:
        """Queues every request with the engine and returns at once (decoupled: responses go through the
        senders). Triton releases the requests when this returns, so their inputs are read here."""
        for request in requests:
            request_id, client = self._sender.open(request.get_response_sender())
            try:
                generation = parse_request(request, client.is_cancelled)
                start_by = _start_by(request)
            except ValueError as exc:
                self._sender.post(GenerationEvent(request_id, error=str(exc)))
                continue
            self._engine.submit(request_id, generation, start_by)
        return None

    def finalize(self) -> None:
        """Answers every open request (UNAVAILABLE: the model is unloading), then stops both threads."""
        self._engine.stop()
        self._sender.stop()


def _start_by(request: Any) -> float | None:
    """The request's start-by (wall clock, from the gateway) on the engine's clock (monotonic), or None."""
    wall_us = start_by_us(json.loads(request.parameters()))
    if wall_us is None:
        return None
    return time.monotonic() + (wall_us / 1e6 - time.time())
