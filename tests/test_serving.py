"""The compiled repository on the real tritonserver, through Triton's own HTTP and gRPC clients."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from sluice.triton_server import TritonServer
from tests.helpers import compiled_triton, metrics_text, sample_value

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Triton batches requests that arrive close together.",
    "Paris is the capital of France.",
    "short",
]
ONE_WORKER = {"worker_count": 1, "batch_size": 1, "batch_timeout": 0.0001}


def stack_config(models: dict[str, Path]) -> dict[str, Any]:
    minilm = str(models["all-MiniLM-L6-v2"])
    return {
        "models": {
            "minilm": {"type": "embedding", "model_name": minilm},
            "minilm_ranker": {"type": "reranker", "model_name": minilm},
            "tiny_cross_encoder": {"type": "reranker", "model_name": str(models["tiny-cross-encoder"])},
            "tiny_llm": {"type": "llm", "model_name": str(models["tiny-llm"]), "max_length": 2048},
        },
        "services": {
            "embedding_service": {"model": "minilm", "runtime": {"worker_count": 2}},
            "reranker_service": {"model": "minilm_ranker", "runtime": {"worker_count": 1}},
            "cross_encoder_service": {"model": "tiny_cross_encoder", "runtime": {"worker_count": 1}},
            "llm_service": {
                "model": "tiny_llm",
                "runtime": {"inference_timeout": 5.0, "total_timeout": 6.0, "max_queue_size": 8},
            },
            # One instance taking one request at a time, with a queue of 2 that only the gateway keeps.
            "flood_service": {
                "model": "minilm",
                "runtime": {**ONE_WORKER, "max_queue_size": 2, "queue_timeout": 5.0, "total_timeout": 6.0},
            },
            # Four rows a batch, one instance: concurrent multi-row requests must queue behind each other.
            "burst_service": {"model": "minilm", "runtime": {"worker_count": 1, "batch_size": 4}},
        },
    }


@pytest.fixture(scope="module")
def triton(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path
) -> Iterator[TritonServer]:
    with compiled_triton(tmp_path_factory.mktemp("stack"), stack_config(demo_models), export_cache) as (server, _):
        yield server


@pytest.fixture(scope="module")
def minilm_reference(demo_models: dict[str, Path]) -> Any:
    """all-MiniLM-L6-v2 in PyTorch: mean pooling over the mask, then L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = demo_models["all-MiniLM-L6-v2"]
    tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory).eval()

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1).numpy()

    return embed


def text_input(name: str, texts: list[str], module: Any) -> Any:
    tensor = module.InferInput(name, [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return tensor


def metrics(server: TritonServer) -> str:
    return metrics_text(server.metrics_url)


def test_embedding_matches_pytorch_when_served_over_http_and_grpc(
    triton: TritonServer, minilm_reference: Any
) -> None:
    expected = minilm_reference(TEXTS)
    http = httpclient.InferenceServerClient(triton.http_address)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    for result in (
        http.infer("embedding_service", [text_input("text", TEXTS, httpclient)]),
        grpc.infer("embedding_service", [text_input("text", TEXTS, grpcclient)]),
    ):
        served = result.as_numpy("embedding")
        assert served.shape == (len(TEXTS), 384)
        cosines = np.sum(served * expected, axis=1) / np.linalg.norm(served, axis=1)
        assert cosines.min() >= 0.999, cosines
        assert result.as_numpy("tokens").ravel().tolist()[3] == 3  # [CLS] short [SEP]
        assert not result.as_numpy("truncated").any()


def test_embedding_reports_truncation_when_text_exceeds_max_length(triton: TritonServer) -> None:
    http = httpclient.InferenceServerClient(triton.http_address)
    result = http.infer("embedding_service", [text_input("text", ["word " * 400, "short"], httpclient)])
    assert result.as_numpy("truncated").ravel().tolist() == [True, False]
    assert result.as_numpy("tokens").ravel().tolist() == [256, 3]


def test_reranker_ranks_the_relevant_document_first_when_scoring_by_cosine(triton: TritonServer) -> None:
    documents = [
        "The stock market fell sharply on Tuesday.",
        "Cats are carnivores: they eat meat and fish.",
        "Paris is the capital of France.",
    ]
    http = httpclient.InferenceServerClient(triton.http_address)
    result = http.infer("reranker_service", [
        text_input("query", ["What do cats eat?"] * 3, httpclient),
        text_input("document", documents, httpclient),
    ])
    scores = result.as_numpy("score").ravel()
    assert int(np.argmax(scores)) == 1
    assert scores[1] > scores[0] + 0.3 and scores[1] > scores[2] + 0.3


def test_cross_encoder_scores_match_pytorch_when_served(triton: TritonServer, demo_models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = demo_models["tiny-cross-encoder"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    queries, documents = ["what do cats eat"] * 2 + ["capital of france"], TEXTS[:3]
    with torch.inference_mode():
        expected = model(**tokenizer(queries, documents, padding=True, return_tensors="pt")).logits[:, 0].numpy()
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    result = grpc.infer("cross_encoder_service", [
        text_input("query", queries, grpcclient), text_input("document", documents, grpcclient)
    ])
    assert np.abs(result.as_numpy("score").ravel() - expected).max() <= 1e-3


def test_triton_rejects_the_request_naming_the_input_when_it_is_missing(triton: TritonServer) -> None:
    http = httpclient.InferenceServerClient(triton.http_address)
    with pytest.raises(InferenceServerException, match="document"):
        http.infer("reranker_service", [text_input("query", ["q"], httpclient)])


# ---- the LLM: streaming, limits, cancellation ------------------------------------------------------------------


def llm_inputs(prompt: str, **options: Any) -> list[Any]:
    inputs = [text_input("text_input", [prompt], grpcclient)]
    kinds = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "seed": ("INT64", np.int64)}
    for name, value in options.items():
        if name == "stop":
            inputs.append(text_input("stop", [json.dumps(value)], grpcclient))
            continue
        kind, dtype = kinds[name]
        tensor = grpcclient.InferInput(name, [1, 1], kind)
        tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
        inputs.append(tensor)
    return inputs


def stream(triton: TritonServer, prompt: str, **options: Any) -> list[dict[str, Any]]:
    """Every response of one gRPC stream, until the final one."""
    responses: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    try:
        client.async_stream_infer("llm_service", llm_inputs(prompt, **options), enable_empty_final_response=False)
        events = []
        while True:
            result = responses.get(timeout=30)
            if isinstance(result, Exception):
                raise result
            events.append({
                "text": result.as_numpy("text_output").ravel()[0].decode(),
                "finish_reason": result.as_numpy("finish_reason").ravel()[0].decode(),
                "completion_tokens": int(result.as_numpy("completion_tokens").ravel()[0]),
            })
            if events[-1]["finish_reason"]:
                return events
    finally:
        client.stop_stream()


def test_llm_streams_pieces_then_a_final_response_when_called_over_grpc(triton: TritonServer) -> None:
    events = stream(triton, "Once upon a time", max_tokens=6, temperature=0.0)
    # One piece a token, unless the pieces of several tokens waited together for the model's sender thread.
    counts = [event["completion_tokens"] for event in events[:-1]]
    assert counts == sorted(set(counts)) and counts[-1] == 6
    assert all(event["text"] for event in events[:-1])
    assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == 6


def test_llm_stops_before_the_stop_string_when_one_is_generated(triton: TritonServer) -> None:
    free = "".join(event["text"] for event in stream(triton, "The weather", max_tokens=8, temperature=0.0))
    words = free.split()
    stop = " " + words[3]
    events = stream(triton, "The weather", max_tokens=8, temperature=0.0, stop=[stop])
    text = "".join(event["text"] for event in events)
    assert events[-1]["finish_reason"] == "stop"
    assert text == free[: free.index(stop)]


def test_llm_honours_max_tokens_when_called_through_generate_stream(triton: TritonServer) -> None:
    body = json.dumps({"text_input": "Hello there", "max_tokens": 4, "temperature": 0.0}).encode()
    request = urllib.request.Request(
        f"{triton.http_url}/v2/models/llm_service/generate_stream", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        lines = [line.decode() for line in response.read().splitlines() if line.startswith(b"data: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    counts = [event["completion_tokens"] for event in events]
    assert counts[:-1] == sorted(set(counts[:-1])) and counts[-2:] == [4, 4]  # pieces, then the final
    assert events[-1]["finish_reason"] == "length"


def test_llm_stops_generating_when_the_client_cancels_its_stream(triton: TritonServer) -> None:
    before = metrics(triton)
    finished = "sluice_llm_requests_finished_total"
    cancelled_before = sample_value(before, finished, model="llm_service", reason="cancelled")
    pieces: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: pieces.put(error or result))
    # 1,900 tokens would take seconds; the service's inference_timeout (5 s) is far away.
    client.async_stream_infer("llm_service", llm_inputs("Tell me everything", max_tokens=1900, temperature=0.0))
    pieces.get(timeout=30)
    started = time.monotonic()
    client.stop_stream(cancel_requests=True)
    while time.monotonic() - started < 3:
        after = metrics(triton)
        if sample_value(after, "sluice_llm_requests_finished_total", model="llm_service", reason="cancelled") > (
            cancelled_before
        ):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the cancelled request did not end within 3 s")
    tokens = sample_value(after, "sluice_llm_completion_tokens_total", model="llm_service")
    tokens_before = sample_value(before, "sluice_llm_completion_tokens_total", model="llm_service")
    assert tokens - tokens_before < 1900


# ---- Triton's scheduling: queues, timeouts, instances, batching -------------------------------------------------


def flood(triton: TritonServer, service: str, count: int) -> list[str]:
    """``count`` concurrent single-text requests; each one's error message, or "" when it succeeded."""

    def one(i: int) -> str:
        client = httpclient.InferenceServerClient(triton.http_address)
        try:
            client.infer(service, [text_input("text", [f"request {i}: " + "lorem ipsum " * 60], httpclient)])
            return ""
        except InferenceServerException as error:
            return str(error)
        finally:
            client.close()  # here, in its own thread: left to __del__, it closes in one without a gevent hub

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_triton_serves_a_whole_flood_when_an_encoders_queue_is_kept_by_the_gateway(triton: TritonServer) -> None:
    # An encoder's max_queue_size is the gateway's (gateway/scheduler.py; tests/test_gateway.py floods it there):
    # Triton has no queue policy for it, which would stall bursts, so a direct client's flood all queues and runs.
    outcomes = flood(triton, "flood_service", 32)
    assert outcomes == [""] * 32, [message for message in outcomes if message][:3]


def test_triton_serves_every_request_of_a_burst_when_requests_queue_behind_a_busy_instance(
    triton: TritonServer,
) -> None:
    # Regression: with default_timeout_microseconds in the queue policy, tritonserver 2.51 left the last
    # request of such a burst in the queue until that timeout and then rejected it (a third of them failed).
    async def burst(client: Any, trial: int) -> list[Any]:
        async def one(rows: int, k: int) -> Any:
            tensor = grpcclient.InferInput("text", [rows, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[f"{trial} {k} {j}".encode()] for j in range(rows)], np.object_))
            return await client.infer("burst_service", [tensor], client_timeout=5)

        return await asyncio.gather(one(4, 0), one(4, 1), one(2, 2), return_exceptions=True)

    async def trials() -> list[Any]:
        client = grpc_aio.InferenceServerClient(triton.grpc_url)
        try:
            return [result for trial in range(10) for result in await burst(client, trial)]
        finally:
            await client.close()

    results = asyncio.run(trials())
    assert [r for r in results if isinstance(r, Exception)] == []


def test_triton_loads_worker_count_instances_when_serving(triton: TritonServer) -> None:
    stubs = []
    for entry in Path("/proc").iterdir():
        try:
            stubs.append((entry / "cmdline").read_bytes().split(b"\0"))
        except OSError:
            continue
    names = {arg.decode() for cmdline in stubs for arg in cmdline if re.match(rb"^\w+_service_\d+_\d+$", arg)}
    assert {name for name in names if name.startswith("embedding_service_")} == {
        "embedding_service_0_0", "embedding_service_0_1"
    }
    assert {name for name in names if name.startswith("reranker_service_")} == {"reranker_service_0_0"}


def test_triton_batches_concurrent_requests_when_sixteen_clients_send_at_once(triton: TritonServer) -> None:
    before = metrics(triton)

    def client_loop(worker: int) -> None:
        client = httpclient.InferenceServerClient(triton.http_address)
        for i in range(12):
            client.infer("embedding_service", [text_input("text", [f"client {worker} sentence {i}"], httpclient)])

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(client_loop, range(16)))
    after = metrics(triton)
    labels = {"model": "embedding_service"}
    requests = sample_value(after, "nv_inference_count", **labels) - sample_value(
        before, "nv_inference_count", **labels
    )
    executions = sample_value(after, "nv_inference_exec_count", **labels) - sample_value(
        before, "nv_inference_exec_count", **labels
    )
    assert requests == 16 * 12
    assert executions <= requests / 2, (executions, requests)


