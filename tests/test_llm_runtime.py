"""Tests of the LLM runtime: the batched decode loop (runtimes/llm.py) on a tiny random-weight Llama with a
byte-level BPE tokenizer (tests/tiny_llm.py, no downloads), and the Triton adapter (runtimes/llm_model.py) against a
fake ``triton_python_backend_utils``."""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runtimes.llm import (
    BatchGenerator,
    GenerationEvent,
    GenerationRequest,
    IncrementalDetokenizer,
    StopStringBuffer,
)
from tests.fake_pb_utils import FakeMetricFamily
from tests.tiny_llm import CORPUS, PROMPTS, collect, greedy, run_alone, variant

# The tiny model and its generator: the ``model_dir`` and ``generator`` fixtures (tests/conftest.py).


def hf_greedy_ids(generator: BatchGenerator, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference completion from transformers' own generate()."""
    ids = torch.tensor([generator.tokenizer(prompt)["input_ids"]])
    output = generator.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return output[0, ids.shape[1] :].tolist()


def forward_batch_sizes(model: Any) -> Iterator[list[int]]:
    sizes: list[int] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sizes.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0])

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


@pytest.fixture
def batch_sizes(generator: BatchGenerator) -> Iterator[list[int]]:
    yield from forward_batch_sizes(generator.model)


# --- requests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({}, "text_input or messages"),
        ({"text_input": "a", "messages": [{"role": "user", "content": "b"}]}, "text_input or messages"),
        ({"text_input": ""}, "text_input"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"text_input": "a", "max_tokens": 0}, "max_tokens"),
        ({"text_input": "a", "temperature": -1.0}, "temperature"),
        ({"text_input": "a", "temperature": float("nan")}, "temperature"),
        ({"text_input": "a", "top_p": 0.0}, "top_p"),
        ({"text_input": "a", "seed": 2**64}, "seed"),
        ({"text_input": "a", "stop": ("",)}, "stop"),
    ],
)
def test_generation_request_raises_naming_field_when_invalid(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        GenerationRequest(**kwargs)


# --- text pipeline ----------------------------------------------------------------------------------------


def test_stop_buffer_holds_back_prefix_when_stop_may_be_split() -> None:
    buffer = StopStringBuffer(["o w"])
    assert buffer.push("hel") == ("hel", False)
    assert buffer.push("lo") == ("l", False)  # "o" may start "o w"
    assert buffer.push(" ") == ("", False)
    assert buffer.push("world") == ("", True)


def test_stop_buffer_releases_held_text_when_stop_does_not_follow() -> None:
    buffer = StopStringBuffer(["abc"])
    assert buffer.push("xab") == ("x", False)
    assert buffer.push("d") == ("abd", False)
    assert buffer.push("ab") == ("", False)
    assert buffer.flush() == "ab"


def test_detokenizer_emits_whole_characters_when_bytes_span_tokens(generator: BatchGenerator) -> None:
    tokenizer = generator.tokenizer
    text = " naïve 日本 fox"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split()) + 4, "expected multi-byte characters split over tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer("the")["input_ids"])
    pieces = [detokenizer.push(token) for token in ids]
    assert "".join(pieces) + detokenizer.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)


# --- decode loop ------------------------------------------------------------------------------------------


def test_generate_matches_transformers_when_greedy(generator: BatchGenerator) -> None:
    expected = hf_greedy_ids(generator, PROMPTS[0], 10)
    outcome = run_alone(generator, greedy(PROMPTS[0], max_tokens=10))
    assert outcome.text == generator.tokenizer.decode(expected, skip_special_tokens=True)


def test_generate_matches_single_requests_when_greedy_requests_are_batched(generator: BatchGenerator) -> None:
    requests = [greedy(prompt, max_tokens=10) for prompt in PROMPTS]
    batched = collect(generator.generate(requests))
    for index, request in enumerate(requests):
        alone = run_alone(generator, request)
        assert batched[index].text == alone.text, PROMPTS[index]
        assert batched[index].final == GenerationEvent(
            index, "", alone.final.finish_reason, alone.final.prompt_tokens, alone.final.completion_tokens
        )


def test_generate_ends_with_length_when_max_tokens_reached(generator: BatchGenerator) -> None:
    final = run_alone(generator, greedy(PROMPTS[1], max_tokens=7)).final
    assert final is not None
    assert (final.finish_reason, final.completion_tokens) == ("length", 7)
    assert final.prompt_tokens == len(generator.tokenizer(PROMPTS[1])["input_ids"])


def test_generate_uses_default_max_tokens_when_request_has_none(generator: BatchGenerator) -> None:
    final = run_alone(generator, greedy(PROMPTS[1])).final
    assert final is not None and final.completion_tokens == generator.default_max_tokens


def split_stop_string(generator: BatchGenerator, prompt: str, max_tokens: int) -> tuple[str, str]:
    """A stop string whose first occurrence in the greedy text straddles a token boundary and follows some
    text, and the whole greedy text."""
    ids = hf_greedy_ids(generator, prompt, max_tokens)
    text = generator.tokenizer.decode(ids)
    bounds = {len(generator.tokenizer.decode(ids[:n])) for n in range(1, len(ids))}
    for start, size in itertools.product(range(len(text)), (3, 2)):
        stop = text[start : start + size]
        first = text.find(stop)
        if first > 0 and len(stop) == size and stop.strip() and any(first < b < first + size for b in bounds):
            return stop, text
    raise AssertionError(f"no usable stop string in {text!r}")


def test_generate_cuts_before_stop_when_stop_string_spans_tokens(generator: BatchGenerator) -> None:
    stop, full_text = split_stop_string(generator, PROMPTS[0], 12)
    outcome = run_alone(generator, greedy(PROMPTS[0], max_tokens=12, stop=("never there", stop)))
    assert outcome.text == full_text[: full_text.find(stop)]
    assert outcome.final is not None and outcome.final.finish_reason == "stop"
    assert stop not in "".join(outcome.pieces)


def test_generate_ends_with_stop_when_eos_generated(generator: BatchGenerator) -> None:
    ids = hf_greedy_ids(generator, PROMPTS[2], 8)
    eos = ids[3]  # pretend the 4th token is the end of sequence
    outcome = run_alone(variant(generator, eos_token_ids=[eos]), greedy(PROMPTS[2], max_tokens=8))
    assert outcome.final is not None
    assert (outcome.final.finish_reason, outcome.final.completion_tokens) == ("stop", ids.index(eos) + 1)
    assert outcome.text == generator.tokenizer.decode(ids[: ids.index(eos)])


def sampled(seed: int) -> GenerationRequest:
    return GenerationRequest(text_input=PROMPTS[0], temperature=1.0, top_p=0.9, seed=seed, max_tokens=10)


def test_generate_repeats_text_when_seed_is_the_same_in_another_batch(generator: BatchGenerator) -> None:
    alone = run_alone(generator, sampled(7))
    batched = collect(generator.generate([greedy(PROMPTS[2]), sampled(7), sampled(8)]))
    assert batched[1].text == alone.text
    assert batched[2].text != alone.text


def test_generate_ends_row_with_cancelled_when_client_cancels(
    generator: BatchGenerator, batch_sizes: list[int]
) -> None:
    cancelled = False
    doomed = GenerationRequest(text_input=PROMPTS[0], temperature=0.0, max_tokens=50, is_cancelled=lambda: cancelled)
    tokens_at_cancel = None
    outcomes: dict[int, list[GenerationEvent]] = {0: [], 1: []}
    for event in generator.generate([doomed, greedy(PROMPTS[1], max_tokens=10)]):
        outcomes[event.index].append(event)
        if event.index == 0 and not cancelled:
            cancelled, tokens_at_cancel = True, event.completion_tokens
    doomed_final, other_final = outcomes[0][-1], outcomes[1][-1]
    assert (doomed_final.finish_reason, doomed_final.completion_tokens) == ("cancelled", tokens_at_cancel)
    assert (other_final.finish_reason, other_final.completion_tokens) == ("length", 10)
    assert batch_sizes[: tokens_at_cancel + 1] == [2] * (tokens_at_cancel or 0) + [1]


def test_generate_ends_with_timeout_when_deadline_passes(generator: BatchGenerator) -> None:
    # One second per clock reading: 0 before the prefill, 1 at the join (deadline 1 + 2.5), then 2, 3, 4 after
    # steps 1, 2, 3: the third reading is past the deadline.
    ticks = itertools.count()
    timed = variant(generator, timeout_s=2.5, clock=lambda: float(next(ticks)))
    final = run_alone(timed, greedy(PROMPTS[0], max_tokens=50)).final
    assert final is not None
    assert (final.finish_reason, final.completion_tokens) == ("timeout", 3)


def test_generate_drops_finished_row_when_it_reaches_max_tokens(
    generator: BatchGenerator, batch_sizes: list[int]
) -> None:
    requests = [greedy(PROMPTS[2], max_tokens=2), greedy(PROMPTS[1], max_tokens=5)]
    outcomes = collect(generator.generate(requests))
    # prefill (2 rows) gives token 1 of both, step 1 (2 rows) token 2, then only the long row remains.
    assert batch_sizes == [2, 2, 1, 1, 1]
    assert outcomes[1].text == run_alone(generator, requests[1]).text


def test_generate_rejects_only_that_request_when_prompt_exceeds_context(generator: BatchGenerator) -> None:
    short = variant(generator, max_length=16)
    outcomes = collect(short.generate([greedy(" ".join(CORPUS)), greedy(PROMPTS[1], max_tokens=50)]))
    rejected, served = outcomes[0].final, outcomes[1].final
    assert rejected is not None and rejected.error is not None
    assert "text_input" in rejected.error and "max_length" in rejected.error
    assert outcomes[0].pieces == []
    # The other request runs, capped by the context rather than its max_tokens.
    assert served is not None and served.finish_reason == "length"
    assert served.prompt_tokens + served.completion_tokens == 16


def test_generate_applies_chat_template_when_messages_given(generator: BatchGenerator) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    rendered = generator.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("assistant:")
    chat = run_alone(generator, GenerationRequest(messages=messages, temperature=0.0, max_tokens=6))
    plain = run_alone(generator, greedy(rendered, max_tokens=6))
    assert chat.text == plain.text
    assert chat.final == plain.final


def test_generate_rejects_request_when_chat_template_fails(generator: BatchGenerator) -> None:
    bad = GenerationRequest(messages=[{"role": "wizard", "content": "hi"}])
    outcomes = collect(generator.generate([bad, greedy(PROMPTS[1], max_tokens=3)]))
    assert outcomes[0].final is not None and "unknown role" in (outcomes[0].final.error or "")
    assert outcomes[1].final is not None and outcomes[1].final.finish_reason == "length"


# --- Triton adapter ---------------------------------------------------------------------------------------


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeTritonError:
    INVALID_ARG = 3
    INTERNAL = 13
    UNAVAILABLE = 14

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: FakeTritonError | None = None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


@dataclass
class FakeSender:
    sent: list[tuple[FakeResponse, int]] = field(default_factory=list)
    cancelled: bool = False
    fail_after: int | None = None  # sends that succeed before the client "goes away"
    closed: threading.Event = field(default_factory=threading.Event)  # set at the FINAL send

    def send(self, response: FakeResponse, flags: int = 0) -> None:
        if self.closed.is_set():
            raise RuntimeError("Response sender has been closed")  # as Triton's: nothing after FINAL
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise RuntimeError("stream closed")
        self.sent.append((response, flags))
        if flags == 1:
            self.closed.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


@dataclass
class FakeRequest:
    inputs: dict[str, np.ndarray]
    sender: FakeSender = field(default_factory=FakeSender)
    request_parameters: dict[str, Any] = field(default_factory=dict)

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def parameters(self) -> str:
        return json.dumps(self.request_parameters)


def wait_closed(*requests: FakeRequest, timeout_s: float = 30.0) -> None:
    """Until every request got its FINAL response (the model answers from its own threads)."""
    for request in requests:
        assert request.sender.closed.wait(timeout_s), f"no final response for {request.inputs}"


def fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    log: Callable[[str], None] = lambda message: None  # noqa: E731
    module.__dict__.update(
        Tensor=FakeTensor,
        TritonError=FakeTritonError,
        InferenceResponse=FakeResponse,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
        MetricFamily=FakeMetricFamily,
        Logger=types.SimpleNamespace(log_info=log, log_warn=log, log_error=log),
        get_input_tensor_by_name=lambda request, name: (
            FakeTensor(name, request.inputs[name]) if name in request.inputs else None
        ),
    )
    return module


@pytest.fixture
def adapter(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    FakeMetricFamily.families.clear()  # this test's model's families only
    # Both import the fake at their own import: fresh copies, so neither keeps another test's fake.
    for name in ("runtimes.llm_model", "runtimes._triton"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("runtimes.llm_model")


def parameters(**values: str) -> dict[str, Any]:
    settings = {
        "artifacts_dir": "hf",
        "max_length": "128",
        "default_max_tokens": "5",
        "batch_size": "4",
        "batch_timeout_us": "0",
        "max_queue_size": "8",
        "inference_timeout_s": "30",
        "queue_timeout_us": "0",
        "intra_op_threads": "0",
        "worker_count": "1",
    } | values
    return {"parameters": {name: {"string_value": value} for name, value in settings.items()}}


def string_input(value: str) -> np.ndarray:
    return np.array([[value.encode()]], dtype=np.object_)


def test_model_refuses_to_load_naming_parameter_when_config_lacks_it(adapter: types.ModuleType) -> None:
    config = parameters()
    del config["parameters"]["default_max_tokens"]
    with pytest.raises(ValueError, match="default_max_tokens"):
        adapter.TritonPythonModel().initialize({"model_config": json.dumps(config)})


@pytest.fixture
def triton_model(adapter: types.ModuleType, model_dir: Path) -> Iterator[Any]:
    model = adapter.TritonPythonModel()
    version_dir = model_dir.parent
    model.initialize(
        {
            "model_config": json.dumps(parameters()),
            "model_repository": str(version_dir.parent),
            "model_version": version_dir.name,
            "model_name": "llm_service",
        }
    )
    yield model
    model.finalize()


def prompt_request(prompt: str, **sender: Any) -> FakeRequest:
    # Greedy, so how a request ends does not depend on a random draw (sampling could pick EOS).
    inputs = {"text_input": string_input(prompt), "temperature": np.array([[0.0]], np.float32)}
    return FakeRequest(inputs, FakeSender(**sender))


def test_model_sends_cancelled_final_when_client_cancelled(adapter: types.ModuleType, model_dir: Path) -> None:
    model = adapter.TritonPythonModel()
    # The idle engine holds both for 0.5 s (batch_timeout): the sender's poll sees the cancellation before.
    config = parameters(batch_timeout_us="500000")
    model.initialize({"model_config": json.dumps(config), "model_repository": str(model_dir.parent.parent),
                      "model_version": model_dir.parent.name, "model_name": "llm_service"})
    gone, other = prompt_request(PROMPTS[0], cancelled=True), prompt_request(PROMPTS[1])
    try:
        model.execute([gone, other])
        wait_closed(gone, other)
    finally:
        model.finalize()
    [(final, flags)] = gone.sender.sent
    assert flags == 1 and final.outputs["finish_reason"].tolist() == [[b"cancelled"]]
    assert other.sender.sent[-1][0].outputs["finish_reason"].tolist() == [[b"length"]]


def metric_values(name: str) -> dict[str, float]:
    [family] = [family for family in FakeMetricFamily.families if family.name == name]
    return {metric.labels.get("reason", ""): metric.value for metric in family.metrics}


def test_model_counts_finish_reasons_and_tokens_when_requests_end(triton_model: Any) -> None:
    first, second = prompt_request(PROMPTS[0]), prompt_request(PROMPTS[1])
    triton_model.execute([first, second])
    wait_closed(first, second)
    triton_model.finalize()  # the sender thread applies the metric updates queued before it stops
    finished = metric_values("sluice_llm_requests_finished_total")
    assert finished == {"stop": 0, "length": 2, "cancelled": 0, "timeout": 0, "error": 0}
    assert metric_values("sluice_llm_completion_tokens_total") == {"": 10}
    [histogram] = [f for f in FakeMetricFamily.families if f.name == "sluice_llm_time_to_first_token_seconds"]
    assert len(histogram.metrics[0].observed) == 2 and histogram.metrics[0].labels == {"model": "llm_service"}


def test_model_serves_others_when_a_client_send_fails(triton_model: Any) -> None:
    broken, other = prompt_request(PROMPTS[0], fail_after=1), prompt_request(PROMPTS[1])
    triton_model.execute([broken, other])
    wait_closed(other)
    assert len(broken.sender.sent) == 1
    assert [flags for _, flags in other.sender.sent].count(1) == 1
    assert other.sender.sent[-1][0].outputs["completion_tokens"].tolist() == [[5]]


def test_model_streams_pieces_then_one_final_when_requests_are_batched(triton_model: Any) -> None:
    model = triton_model
    good = FakeRequest({"text_input": string_input(PROMPTS[0]), "temperature": np.array([[0.0]], np.float32)})
    bad = FakeRequest({"text_input": string_input("hi"), "stop": string_input("not json")})
    chat = FakeRequest(
        {
            "messages": string_input(json.dumps([{"role": "user", "content": "hello"}])),
            "max_tokens": np.array([[3]], np.int32),
            "seed": np.array([[1]], np.int64),
        }
    )
    assert model.execute([good, bad, chat]) is None
    wait_closed(good, bad, chat)

    (error, flags), *rest = bad.sender.sent
    assert rest == [] and flags == 1 and "stop" in error.error.message
    for request, max_tokens in ((good, 5), (chat, 3)):
        *pieces, (final, final_flags) = request.sender.sent
        assert [flags for _, flags in pieces] == [0] * len(pieces) and final_flags == 1
        assert all(response.outputs["finish_reason"][0, 0] == b"" for response, _ in pieces)
        assert final.outputs["text_output"].tolist() == [[b""]]
        assert final.outputs["finish_reason"].tolist() == [[b"length"]]
        assert final.outputs["completion_tokens"].dtype == np.int32
        assert final.outputs["completion_tokens"].tolist() == [[max_tokens]]


def test_model_refuses_unavailable_when_its_queue_is_full(adapter: types.ModuleType, model_dir: Path) -> None:
    model = adapter.TritonPythonModel()
    config = parameters(batch_size="1", max_queue_size="1", default_max_tokens="200")
    model.initialize({"model_config": json.dumps(config), "model_repository": str(model_dir.parent.parent),
                      "model_version": model_dir.parent.name, "model_name": "llm_service"})
    try:
        requests = [prompt_request(PROMPTS[0]) for _ in range(4)]  # one runs, one waits, the others are refused
        model.execute(requests[:1])
        # Only once the first runs are the others sent: before that it, too, would still be waiting.
        deadline = time.monotonic() + 10
        while model._engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        model.execute(requests[1:])
        wait_closed(*requests)
    finally:
        model.finalize()
    refusals = [r.sender.sent[-1][0].error for r in requests if r.sender.sent[-1][0].error is not None]
    assert [(e.code, e.message) for e in refusals] == [(14, "Exceeds maximum queue size")] * 2


def test_model_answers_every_open_request_when_it_is_unloaded(adapter: types.ModuleType, model_dir: Path) -> None:
    model = adapter.TritonPythonModel()
    config = parameters(batch_size="1", max_queue_size="4", default_max_tokens="240", max_length="256")
    model.initialize({"model_config": json.dumps(config), "model_repository": str(model_dir.parent.parent),
                      "model_version": model_dir.parent.name, "model_name": "llm_service"})
    requests = [prompt_request(PROMPTS[0]) for _ in range(3)]
    model.execute(requests)
    model.finalize()
    finals = [request.sender.sent[-1] for request in requests]
    assert all(flags == 1 for _, flags in finals)
    unloaded = [final.error for final, _ in finals if final.error is not None]
    # The two waiting at least; the running one too unless it ended first.
    assert len(unloaded) >= 2 and all(e.code == 14 and "unloading" in e.message for e in unloaded)
    assert not [t for t in threading.enumerate() if t.name in ("llm-engine", "llm-sender")]


# --- inside the real tritonserver -------------------------------------------------------------------------


def llm_config_pbtxt(name: str, parameters: dict[str, Any]) -> str:
    """A decoupled config.pbtxt spelled from the tensor contract (what the compiler renders for an LLM)."""
    from runtimes.signatures import LLM_INPUTS, LLM_OUTPUTS

    def tensors(section: str, specs: Iterable[Any]) -> str:
        rows = [
            f'{{ name: "{t.name}" data_type: TYPE_{t.data_type} dims: {list(t.dims)}'
            + (" optional: true" if t.optional else "")
            + " }"
            for t in specs
        ]
        return f"{section} [\n  " + ",\n  ".join(rows) + "\n]"

    settings = "\n".join(
        f'parameters {{ key: "{key}" value {{ string_value: "{entry["string_value"]}" }} }}'
        for key, entry in parameters["parameters"].items()
    )
    return "\n".join(
        [
            f'name: "{name}"',
            'backend: "python"',
            "max_batch_size: 4",
            "dynamic_batching { max_queue_delay_microseconds: 0 }",
            "model_transaction_policy { decoupled: true }",
            "instance_group { count: 1 kind: KIND_CPU }",
            tensors("input", LLM_INPUTS),
            tensors("output", LLM_OUTPUTS),
            settings,
        ]
    )


@pytest.mark.integration
def test_model_streams_in_triton_when_served_by_tritonserver(
    model_dir: Path, generator: BatchGenerator, tmp_path: Path
) -> None:
    import queue
    import shutil

    import tritonclient.grpc as grpcclient

    from compiler.schema import Server
    from sluice.triton_server import TritonServer, TritonSettings, free_ports

    runtimes = Path(__file__).parents[1] / "runtimes"
    version = tmp_path / "repository" / "llm_service" / "1"
    shutil.copytree(model_dir, version / "hf")
    shutil.copytree(runtimes, version / "runtimes", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(runtimes / "llm_model.py", version / "model.py")
    (version.parent / "config.pbtxt").write_text(llm_config_pbtxt("llm_service", parameters()))
    (tmp_path / "work").mkdir()
    http_port, grpc_port, metrics_port = free_ports(3)
    server_section = Server(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    settings = TritonSettings(tmp_path / "repository", tmp_path / "work", server_section)

    def string(name: str, value: str) -> Any:
        tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(string_input(value))
        return tensor

    greedy_input = grpcclient.InferInput("temperature", [1, 1], "FP32")
    greedy_input.set_data_from_numpy(np.array([[0.0]], np.float32))
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with TritonServer(settings) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("llm_service", [string("text_input", PROMPTS[0]), greedy_input], request_id="ok")
        client.async_stream_infer("llm_service", [string("messages", "{}")], request_id="bad")
        received: list[tuple[Any, Any]] = []
        # Until both streams ended: an error (the bad request) and a final response (the good one).
        while sum(error is not None or result.as_numpy("finish_reason")[0, 0] != b"" for result, error in received) < 2:
            received.append(responses.get(timeout=60))
        client.stop_stream()

    errors = [str(error) for result, error in received if error is not None]
    assert len(errors) == 1 and "messages" in errors[0]
    pieces = [result for result, error in received if error is None]
    assert all(result.get_response().id == "ok" for result in pieces)
    text = b"".join(result.as_numpy("text_output")[0, 0] for result in pieces).decode()
    assert text == run_alone(generator, greedy(PROMPTS[0], max_tokens=5)).text
    assert pieces[-1].as_numpy("finish_reason").tolist() == [[b"length"]]
    assert pieces[-1].as_numpy("completion_tokens").tolist() == [[5]]
