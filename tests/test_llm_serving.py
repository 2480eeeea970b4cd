"""The LLM engine inside a real tritonserver: continuous batching, its queue's refusals, cancellation, finish
reasons, metrics and shutdown, over gRPC streams; and a refusal through the gateway.

One server for the module, over a compiled repository whose services use small knobs. The model is the tiny
Llama of tests/tiny_llm.py with sharp attention (its text depends on positions, so a row misplaced when it joins a
running batch writes another text), 8 layers and no end-of-sequence token: greedy generations run to max_tokens, and
1,900 tokens take seconds, long enough to hold both slots of the batch while a test fills the queue behind."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.settings import GatewaySettings
from sluice.triton_server import TritonServer
from tests.gateway_server import GatewayServer
from tests.helpers import compiled_triton, metrics_text, sample_value
from tests.tiny_llm import PROMPTS, save_tiny_llm

pytestmark = pytest.mark.integration

QUEUE_FULL, QUEUE_TIMEOUT = "Exceeds maximum queue size", "Request timeout expired"
BATCH_SIZE, MAX_QUEUE_SIZE, QUEUE_TIMEOUT_S, HASTY_TIMEOUT_S = 2, 2, 1.0, 0.3
LONG = 1900  # tokens: seconds of work
FAST = {"rate_limit": 1000.0, "batch_timeout": 0.0001}


def serving_config(model: Path) -> dict[str, Any]:
    return {
        "models": {"tiny": {"type": "llm", "model_name": str(model), "max_length": 2048, "max_tokens": 16}},
        "services": {
            "llm_service": {"model": "tiny", "runtime": {
                **FAST, "batch_size": BATCH_SIZE, "max_queue_size": MAX_QUEUE_SIZE, "queue_timeout": QUEUE_TIMEOUT_S,
                "inference_timeout": 5.0, "total_timeout": 6.0,
            }},
            # Stopped by inference_timeout long before max_tokens.
            "hasty_llm": {"model": "tiny", "runtime": {
                **FAST, "batch_size": BATCH_SIZE, "queue_timeout": 0.2, "inference_timeout": HASTY_TIMEOUT_S,
                "total_timeout": 1.0,
            }},
        },
    }


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm") / "hf", max_positions=2048, layers=8,
                         attention_scale=8, can_end=False)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, served_model: Path, export_cache: Path
) -> Iterator[tuple[TritonServer, Path]]:
    with compiled_triton(tmp_path_factory.mktemp("llm-stack"), serving_config(served_model), export_cache) as stack:
        yield stack


@pytest.fixture
def triton(stack: tuple[TritonServer, Path]) -> Iterator[TritonServer]:
    """The module's server, with both services idle when the test ends (streams left open are cancelled)."""
    server, _ = stack
    yield server
    wait_for(lambda: all(metric(server, gauge, service) == 0 for gauge in ("sluice_llm_running", "sluice_llm_waiting")
                         for service in ("llm_service", "hasty_llm")), "the engines to become idle")


# --- clients ----------------------------------------------------------------------------------------------


def llm_inputs(prompt: str, **options: Any) -> list[Any]:
    kinds = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32)}
    tensors = []
    for name, value in {"text_input": prompt, "temperature": 0.0, **options}.items():
        if name in ("text_input", "stop"):
            tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
            text = value if name == "text_input" else json.dumps(value)
            tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        else:
            kind, dtype = kinds[name]
            tensor = grpcclient.InferInput(name, [1, 1], kind)
            tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
        tensors.append(tensor)
    return tensors


class Stream:
    """One generation on a gRPC stream of its own (as the gateway sends them), recording what came back and when."""

    def __init__(self, triton: TritonServer, prompt: str, service: str = "llm_service", **options: Any) -> None:
        self.client = grpcclient.InferenceServerClient(triton.grpc_url)
        self.closed = False
        self.pieces: list[tuple[float, str]] = []
        self.finish_reason = ""
        self.completion_tokens = 0
        self.error: str | None = None
        self.ended_at = 0.0
        self.started = threading.Event()  # the first piece of text came
        self.ended = threading.Event()  # a final response or an error came
        self.client.start_stream(callback=self._receive)
        self.sent_at = time.monotonic()
        self.client.async_stream_infer(service, llm_inputs(prompt, **options))

    def _receive(self, result: Any, error: Any) -> None:
        now = time.monotonic()
        if self.ended.is_set() or self.closed:  # e.g. the CANCELLED that closing the stream reports locally
            return
        if error is not None:
            self.error, self.ended_at = str(error), now
            self.ended.set()
            return
        text = result.as_numpy("text_output").ravel()[0].decode()
        if text:
            self.pieces.append((now, text))
            self.started.set()
        reason = result.as_numpy("finish_reason").ravel()[0].decode()
        if reason:
            self.finish_reason, self.ended_at = reason, now
            self.completion_tokens = int(result.as_numpy("completion_tokens").ravel()[0])
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.pieces)

    @property
    def first_at(self) -> float:
        return self.pieces[0][0]

    def wait_started(self, timeout_s: float = 30) -> Stream:
        assert self.started.wait(timeout_s), f"no text in {timeout_s} s (error: {self.error})"
        return self

    def wait_ended(self, timeout_s: float = 30) -> Stream:
        assert self.ended.wait(timeout_s), f"no final response or error in {timeout_s} s"
        return self

    def close(self) -> None:
        """Ends the stream; a request still open is cancelled at Triton (the client went away). One that ended is
        not: cancelling a finished stream can leave tritonserver unable to unload the model at shutdown."""
        if not self.closed:
            self.closed = True
            self.client.stop_stream(cancel_requests=not self.ended.is_set())
            self.client.close()


@contextlib.contextmanager
def streams() -> Iterator[Callable[..., Stream]]:
    """``open(triton, prompt, ...)`` starts a Stream; all are closed when the block ends."""
    opened: list[Stream] = []

    def open_stream(*args: Any, **kwargs: Any) -> Stream:
        opened.append(Stream(*args, **kwargs))
        return opened[-1]

    try:
        yield open_stream
    finally:
        for stream in opened:
            stream.close()


def metric(triton: TritonServer, name: str, service: str = "llm_service", **labels: str) -> float:
    return sample_value(metrics_text(triton.metrics_url), name, model=service, **labels)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def finished(triton: TritonServer, reason: str) -> float:
    return metric(triton, "sluice_llm_requests_finished_total", reason=reason)


def refused(triton: TritonServer, reason: str) -> float:
    return metric(triton, "sluice_llm_refused_total", reason=reason)


def fill(open_stream: Callable[..., Stream], triton: TritonServer) -> tuple[list[Stream], list[Stream]]:
    """Both slots taken by long generations, then the queue filled: (running, waiting)."""
    running = [open_stream(triton, PROMPTS[i], max_tokens=LONG).wait_started() for i in range(BATCH_SIZE)]
    waiting = [open_stream(triton, PROMPTS[3], max_tokens=5) for _ in range(MAX_QUEUE_SIZE)]
    wait_for(lambda: metric(triton, "sluice_llm_waiting") == MAX_QUEUE_SIZE, "the queue to fill", timeout_s=2)
    return running, waiting


# --- continuous batching ----------------------------------------------------------------------------------


def test_requests_joining_a_running_batch_stream_what_they_stream_alone_and_short_ones_finish_first(
    triton: TritonServer,
) -> None:
    long = {"max_tokens": 300}
    # A 2-token prompt and a 32-token one, joining the 9-token long one's batch at different steps.
    joiners = [(PROMPTS[3], 12), (PROMPTS[2], 8)]
    with streams() as open_stream:
        alone = [open_stream(triton, prompt, max_tokens=n).wait_ended() for prompt, n in [(PROMPTS[0], 300), *joiners]]
        first = open_stream(triton, PROMPTS[0], **long).wait_started()
        joined = []
        for prompt, max_tokens in joiners:  # one after the other: one slot is free
            joined.append(open_stream(triton, prompt, max_tokens=max_tokens).wait_ended())
        first.wait_ended()

    for served, reference in zip([first, *joined], alone, strict=True):
        assert served.error is None and reference.error is None
        assert served.text == reference.text
        assert served.finish_reason == reference.finish_reason == "length"
        assert served.completion_tokens == reference.completion_tokens
    for short in joined:  # they started after the long one and ended before it: they ran beside it
        assert first.first_at < short.first_at and short.ended_at < first.ended_at


# --- the engine's queue -----------------------------------------------------------------------------------


def test_a_full_queue_and_a_queue_timeout_refuse_requests_as_errors_of_their_streams(triton: TritonServer) -> None:
    full_before, timeout_before = refused(triton, "queue_full"), refused(triton, "queue_timeout")
    with streams() as open_stream:
        running, waiting = fill(open_stream, triton)
        extra = open_stream(triton, PROMPTS[1], max_tokens=5).wait_ended(timeout_s=2)
        for stream in waiting:
            stream.wait_ended(timeout_s=QUEUE_TIMEOUT_S + 2)
        still_running = [not stream.ended.is_set() for stream in running]

    assert extra.error is not None and QUEUE_FULL in extra.error and extra.pieces == []
    assert extra.ended_at - extra.sent_at < 0.5  # at once, not at a step of the engine's
    for stream in waiting:
        assert stream.error is not None and QUEUE_TIMEOUT in stream.error and stream.pieces == []
        assert QUEUE_TIMEOUT_S <= stream.ended_at - stream.sent_at < QUEUE_TIMEOUT_S + 0.5
    assert all(still_running)
    wait_for(lambda: refused(triton, "queue_timeout") == timeout_before + MAX_QUEUE_SIZE, "the refusals counted")
    assert refused(triton, "queue_full") == full_before + 1


def test_cancelling_a_waiting_and_a_running_request_frees_their_slots_when_clients_leave(
    triton: TritonServer,
) -> None:
    cancelled_before, full_before = finished(triton, "cancelled"), refused(triton, "queue_full")
    with streams() as open_stream:
        running, waiting = fill(open_stream, triton)
        waiting[0].close()  # gone before it started: its place in the queue is free again
        wait_for(lambda: finished(triton, "cancelled") == cancelled_before + 1, "the waiting request to end")
        late = open_stream(triton, PROMPTS[1], max_tokens=5)
        running[0].close()  # gone while generating: the oldest waiting request takes its slot
        waiting[1].wait_ended(timeout_s=QUEUE_TIMEOUT_S)
        other_running = not running[1].ended.is_set()
        running[1].close()
        late.wait_ended(timeout_s=QUEUE_TIMEOUT_S)

    assert (waiting[1].finish_reason, waiting[1].completion_tokens) == ("length", 5)
    assert other_running  # it did not wait for the other long one to end
    assert (late.error, late.finish_reason) == (None, "length")  # admitted to the queue, then run
    wait_for(lambda: finished(triton, "cancelled") == cancelled_before + 3, "the running requests to end")
    assert refused(triton, "queue_full") == full_before


# --- how a stream ends ------------------------------------------------------------------------------------


def test_a_stop_string_max_tokens_and_inference_timeout_end_streams_with_their_finish_reason(
    triton: TritonServer,
) -> None:
    with streams() as open_stream:
        free = open_stream(triton, PROMPTS[0], max_tokens=12).wait_ended()
        stop = first_new_substring(free.text, 3)
        stopped = open_stream(triton, PROMPTS[0], max_tokens=12, stop=["never generated", stop]).wait_ended()
        hasty = open_stream(triton, PROMPTS[1], "hasty_llm", max_tokens=LONG).wait_ended()

    assert (free.finish_reason, free.completion_tokens) == ("length", 12)
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop)]
    assert hasty.finish_reason == "timeout" and 0 < hasty.completion_tokens < LONG
    assert HASTY_TIMEOUT_S <= hasty.ended_at - hasty.sent_at < HASTY_TIMEOUT_S + 1


def first_new_substring(text: str, size: int) -> str:
    """A stop string: the first ``size`` characters of ``text`` after its start that do not occur earlier."""
    for start in range(1, len(text) - size + 1):
        candidate = text[start : start + size]
        if candidate.strip() and text.find(candidate) == start:
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


# --- metrics ----------------------------------------------------------------------------------------------


def test_the_running_peak_stays_at_batch_size_and_latency_histograms_move_when_flooded(
    triton: TritonServer,
) -> None:
    first_tokens_before = metric(triton, "sluice_llm_time_to_first_token_seconds_count")
    waits_before = metric(triton, "sluice_llm_queue_wait_seconds_count")
    per_token_before = metric(triton, "sluice_llm_time_per_output_token_seconds_count")
    full_before = refused(triton, "queue_full")
    with streams() as open_stream:
        flood = [open_stream(triton, PROMPTS[i % 4], max_tokens=60) for i in range(8)]
        for stream in flood:
            stream.wait_ended()
    served = [stream for stream in flood if stream.error is None]
    turned_away = [stream for stream in flood if stream.error is not None]
    assert all(stream.finish_reason == "length" for stream in served)
    assert all(QUEUE_FULL in str(stream.error) for stream in turned_away)
    assert len(served) >= BATCH_SIZE and turned_away
    wait_for(lambda: metric(triton, "sluice_llm_time_to_first_token_seconds_count") == first_tokens_before
             + len(served), "the first tokens counted")
    assert metric(triton, "sluice_llm_queue_wait_seconds_count") == waits_before + len(served)
    assert metric(triton, "sluice_llm_time_per_output_token_seconds_count") == per_token_before + len(served)
    assert refused(triton, "queue_full") == full_before + len(turned_away)
    time.sleep(0.2)  # the gauges are refreshed every 0.1 s
    assert metric(triton, "sluice_llm_running_peak") == BATCH_SIZE


# --- through the gateway ----------------------------------------------------------------------------------


def test_the_gateway_answers_503_with_retry_after_when_the_engine_refuses_a_stream_for_a_full_queue(
    stack: tuple[TritonServer, Path], triton: TritonServer
) -> None:
    _, repository = stack
    settings = GatewaySettings.from_repository(repository, triton_grpc=triton.grpc_url, environ={})
    body = {"model": "llm_service", "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "stream": True}
    with GatewayServer(settings) as gateway, httpx.Client(base_url=gateway.url, timeout=30) as http:
        with streams() as open_stream:
            fill(open_stream, triton)
            with http.stream("POST", "/v1/completions", json=body) as response:
                response.read()
        wait_for(lambda: metric(triton, "sluice_llm_running") == 0, "the cancelled requests to end")
        served = http.post("/v1/completions", json=body)  # once the queue emptied

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert not response.headers["content-type"].startswith("text/event-stream")
    error = response.json()["error"]
    assert error["code"] == "unavailable" and QUEUE_FULL in error["message"]
    # With room in the queue, the same stream is a 200 of server-sent events.
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/event-stream")
    assert '"finish_reason":"length"' in served.text and served.text.endswith("data: [DONE]\n\n")


# --- shutdown ---------------------------------------------------------------------------------------------


def test_stopping_tritonserver_answers_open_streams_and_exits_when_clients_close_ended_streams(
    tmp_path: Path, served_model: Path, export_cache: Path
) -> None:
    # Triton unloads a model (and so calls its finalize) only once every stream that used it is closed: the engine
    # goes on serving its running and waiting requests after SIGTERM, and the clients close their streams once
    # answered, as the gateway does.
    config = serving_config(served_model)
    del config["services"]["hasty_llm"]
    with compiled_triton(tmp_path, config, export_cache) as (server, _), streams() as open_stream:
        running = [open_stream(server, PROMPTS[i], max_tokens=200).wait_started() for i in range(BATCH_SIZE)]
        waiting = open_stream(server, PROMPTS[3], max_tokens=5)
        wait_for(lambda: metric(server, "sluice_llm_waiting") == 1, "the third request to wait", timeout_s=2)
        stopping = threading.Thread(target=server.stop)
        started = time.monotonic()
        stopping.start()
        for stream in [*running, waiting]:
            stream.wait_ended(timeout_s=8)
            stream.close()
        stopping.join(timeout=20)
        took = time.monotonic() - started
        log = server.log_text()
    assert not stopping.is_alive() and not server.is_running()
    for stream in running:
        assert (stream.error, stream.finish_reason, stream.completion_tokens) == (None, "length", 200)
    # Started once a slot freed, after SIGTERM; or refused if that took longer than its queue_timeout.
    assert waiting.finish_reason == "length" or QUEUE_TIMEOUT in str(waiting.error)
    assert "successfully unloaded 'llm_service'" in log and "Exit timeout expired" not in log
    assert took < 8, took  # it exited on SIGTERM, not on the SIGKILL 10 s later


def test_stopping_tritonserver_exits_cleanly_after_the_gateway_has_streamed_completions(
    tmp_path: Path, served_model: Path, export_cache: Path
) -> None:
    # The gateway lets a stream whose last response came end by itself: cancelling such a stream used to leave
    # tritonserver 2.51 unable to unload the model at a stop ("Exit timeout expired", then SIGKILL).
    config = serving_config(served_model)
    del config["services"]["hasty_llm"]
    with compiled_triton(tmp_path, config, export_cache) as (server, repository):
        settings = GatewaySettings.from_repository(repository, triton_grpc=server.grpc_url, environ={})
        with GatewayServer(settings) as gateway, httpx.Client(base_url=gateway.url, timeout=30) as http:
            for prompt in PROMPTS * 2:
                body = {"model": "llm_service", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
                assert http.post("/v1/completions", json=body).text.endswith("data: [DONE]\n\n")
            started = time.monotonic()
            server.stop()
            took = time.monotonic() - started
        log = server.log_text()
    assert "successfully unloaded 'llm_service'" in log and "Exit timeout expired" not in log
    assert took < 8, took
