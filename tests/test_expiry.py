"""No work for the dead, and big requests succeed: the encoders' start-by check and their warm-up at load.

A request carrying ``sluice_start_by_us`` (START_BY_PARAMETER) that has passed when its batch starts is answered
UNAVAILABLE "Request timeout expired" (HTTP 503) without being computed; the first full-size batch after start
runs as warm as the later ones.
"""

from __future__ import annotations

import os
import re
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from runtimes.encoders import OnnxEncoder, cosine_scores, long_texts
from runtimes.signatures import START_BY_PARAMETER
from tests.fake_pb_utils import FINAL, FakeMetricFamily, FakeResponse, FakeTritonError, runtime_helpers
from tests.helpers import compiled_triton, metrics_text, sample_value

# --- runtimes/_triton.py against a fake triton_python_backend_utils ----------------------------------------------


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[FakeResponse, int]] = []

    def send(self, response: FakeResponse, flags: int = 0) -> None:
        self.sent.append((response, flags))


class FakeRequest:
    def __init__(self, parameters: str = "{}") -> None:
        self._parameters, self.sender = parameters, FakeSender()

    def parameters(self) -> str:
        return self._parameters

    def get_response_sender(self) -> FakeSender:
        return self.sender


@pytest.fixture
def triton_helpers(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    yield from runtime_helpers(monkeypatch)


NOW_US = 1_800_000_000_000_000


def test_is_expired_false_when_the_request_has_no_start_by(triton_helpers: types.ModuleType) -> None:
    assert not triton_helpers.is_expired({}, NOW_US)
    assert not triton_helpers.is_expired({"priority": 1}, NOW_US)


@pytest.mark.parametrize(("start_by", "expired"), [(NOW_US - 1, True), (NOW_US, False), (NOW_US + 1, False)])
def test_is_expired_true_only_when_the_start_by_has_passed(
    triton_helpers: types.ModuleType, start_by: int, expired: bool
) -> None:
    assert triton_helpers.is_expired({START_BY_PARAMETER: start_by}, NOW_US) is expired


@pytest.mark.parametrize("start_by", ["1800000000000000", 1.8e15, True])
def test_is_expired_raises_naming_the_parameter_when_the_start_by_is_not_an_integer(
    triton_helpers: types.ModuleType, start_by: object
) -> None:
    with pytest.raises(ValueError, match=f"parameter '{START_BY_PARAMETER}' must be an integer"):
        triton_helpers.is_expired({START_BY_PARAMETER: start_by}, NOW_US)


def test_expiry_answers_only_expired_requests_unavailable_through_their_sender_when_a_batch_mixes_them(
    triton_helpers: types.ModuleType,
) -> None:
    now_us = time.time_ns() // 1_000
    expired = FakeRequest(f'{{"{START_BY_PARAMETER}": {now_us - 1_000_000}}}')
    future = FakeRequest(f'{{"{START_BY_PARAMETER}": {now_us + 60_000_000}}}')
    malformed = FakeRequest(f'{{"{START_BY_PARAMETER}": "soon"}}')
    without = FakeRequest()
    computed: list[list[Any]] = []

    def respond(requests: list[Any]) -> list[Any]:
        computed.append(requests)
        return [FakeResponse(output_tensors=["rows"]) for _ in requests]

    expiry = triton_helpers.Expiry("embedding_service")
    responses = expiry.serve([expired, future, malformed, without], respond)

    assert computed == [[future, without]]
    assert responses[0] is None and responses[2] is None  # answered through their senders
    assert responses[1].output_tensors == ["rows"] and responses[3].output_tensors == ["rows"]
    ((refusal, flags),) = expired.sender.sent
    assert (refusal.error.code, refusal.error.message, flags) == (
        FakeTritonError.UNAVAILABLE,
        "Request timeout expired",
        FINAL,
    )
    ((invalid, _),) = malformed.sender.sent
    assert invalid.error.code == FakeTritonError.INVALID_ARG and START_BY_PARAMETER in invalid.error.message
    assert not future.sender.sent and not without.sender.sent
    (family,) = FakeMetricFamily.families
    (counter,) = family.metrics
    assert (family.name, counter.labels, counter.value) == (
        "sluice_requests_expired_total",
        {"model": "embedding_service"},
        1,
    )


def test_expiry_passes_the_batch_through_untouched_when_nothing_expired(triton_helpers: types.ModuleType) -> None:
    requests = [FakeRequest(), FakeRequest(f'{{"{START_BY_PARAMETER}": {time.time_ns() // 1_000 + 60_000_000}}}')]
    sentinel = [FakeResponse(), FakeResponse()]
    seen: list[list[Any]] = []
    assert triton_helpers.Expiry("m").serve(requests, lambda batch: seen.append(batch) or sentinel) is sentinel
    assert seen[0] is requests


def test_expiry_computes_nothing_when_every_request_expired(triton_helpers: types.ModuleType) -> None:
    requests = [FakeRequest(f'{{"{START_BY_PARAMETER}": 1}}') for _ in range(3)]
    expiry = triton_helpers.Expiry("m")
    assert expiry.serve(requests, lambda batch: pytest.fail("computed expired requests")) == [None, None, None]
    assert FakeMetricFamily.families[0].metrics[0].value == 3


def test_cosine_scores_returns_no_rows_when_given_no_pairs() -> None:
    # The encoder is never reached: before, zero pairs (every request of a batch refused) failed in einsum.
    scored = cosine_scores(cast(OnnxEncoder, None), [])
    assert scored.values.shape == scored.tokens.shape == scored.truncated.shape == (0,)


def test_long_texts_are_distinct_and_each_fills_max_length_when_tokenized() -> None:
    from tokenizers import Tokenizer

    from sluice.demo_models import minilm_source

    tokenizer = Tokenizer.from_file(str(minilm_source() / "tokenizer.json"))
    tokenizer.enable_truncation(256)
    texts = long_texts(16, 256, "query ")
    assert len(set(texts)) == 16
    assert {len(encoding.ids) for encoding in tokenizer.encode_batch(texts)} == {256}
    assert all(encoding.overflowing for encoding in tokenizer.encode_batch(texts))


# --- inside the real tritonserver -------------------------------------------------------------------------------

BATCH_SIZE = 16
MAX_LENGTH = {"minilm": 256, "cross_encoder": 512}  # the schema's defaults for an embedding and a reranker
ROUNDS = 3  # full batches sent expired, then on time, in the start-by test


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path) -> Iterator[Any]:
    """One embedding and one reranker service for the start-by tests, and a fresh pair that only the warm-up test
    sends to (so that its first request is the first after start whatever tests run)."""
    root = tmp_path_factory.mktemp("expiry")
    # A full batch of long rows takes longer than the types' default inference_timeout on 2 busy cores, which would
    # stop it (tests/test_encoder_timeout.py): these tests time the start-by check and the warm-up, not that.
    runtime = {"worker_count": 1, "batch_size": BATCH_SIZE, "inference_timeout": 10, "total_timeout": 12}
    config = {
        "models": {
            "minilm": {"type": "embedding", "model_name": str(demo_models["all-MiniLM-L6-v2"])},
            "cross_encoder": {"type": "reranker", "model_name": str(demo_models["tiny-cross-encoder"])},
        },
        "services": {
            # The embedding keeps its type's default enable_cache (true), as a deployment would.
            "embedding_service": {"model": "minilm", "runtime": runtime},
            "reranker_service": {"model": "cross_encoder", "runtime": runtime},
            "warm_embedding": {"model": "minilm", "runtime": runtime},
            "warm_reranker": {"model": "cross_encoder", "runtime": runtime},
        },
    }
    with compiled_triton(root, config, export_cache) as (server, _):
        yield server


INPUTS = {"embedding_service": ("text",), "reranker_service": ("query", "document")}
INPUTS.update(warm_embedding=INPUTS["embedding_service"], warm_reranker=INPUTS["reranker_service"])
MODEL = {"embedding_service": "minilm", "reranker_service": "cross_encoder"}
MODEL.update(warm_embedding="minilm", warm_reranker="cross_encoder")


def rows_input(module: Any, service: str, texts: list[str]) -> list[Any]:
    """One request of ``texts`` as rows: the text, or (the text as query, the text as document)."""
    tensors = []
    for name in INPUTS[service]:
        tensor = module.InferInput(name, [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()] for text in texts], dtype=np.object_))
        tensors.append(tensor)
    return tensors


def now_us() -> int:
    return time.time_ns() // 1_000


def stub_pid(server: Any, service: str) -> int:
    """The pid of the Python-backend stub process serving ``service`` (one instance: worker_count 1)."""
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, NotADirectoryError):
            continue
        parent = re.search(r"^PPid:\s+(\d+)$", status, re.M)
        model_py = command[1] if len(command) > 1 else b""
        if parent and int(parent.group(1)) == server.pid and model_py.endswith(f"/{service}/1/model.py".encode()):
            return int(entry.name)
    raise AssertionError(f"no stub process of {service} under tritonserver {server.pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (onnxruntime's included): what computing costs,
    however busy the machine is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    match = re.search(r"^VmHWM:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match, f"no VmHWM for pid {pid}"
    return int(match.group(1)) / 1024


def expired_count(server: Any, service: str) -> float:
    return sample_value(metrics_text(server.metrics_url), "sluice_requests_expired_total", model=service)


@pytest.mark.integration
@pytest.mark.parametrize("service", ["embedding_service", "reranker_service"])
def test_encoder_answers_unavailable_without_computing_when_the_start_by_has_passed(triton: Any, service: str) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(triton.http_address)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    pid, length = stub_pid(triton, service), MAX_LENGTH[MODEL[service]]
    before = expired_count(triton, service)

    # Full batches of long rows, a second late: over HTTP 503, and their CPU cost is the check's, not the model's.
    cpu = cpu_seconds(pid)
    for attempt in range(ROUNDS):
        with pytest.raises(InferenceServerException) as refused:
            http.infer(
                service,
                rows_input(httpclient, service, long_texts(BATCH_SIZE, length, f"late {attempt} ")),
                parameters={START_BY_PARAMETER: now_us() - 1_000_000},
            )
        assert refused.value.status() == "503"
        assert refused.value.message() == "Request timeout expired"
    expired_cpu = cpu_seconds(pid) - cpu

    # Over gRPC (as the gateway sends it: an int64_param), UNAVAILABLE.
    with pytest.raises(InferenceServerException) as refused:
        grpc.infer(
            service,
            rows_input(grpcclient, service, long_texts(BATCH_SIZE, length, "late grpc ")),
            parameters={START_BY_PARAMETER: now_us() - 1},
        )
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert "Request timeout expired" in str(refused.value.message())
    assert expired_count(triton, service) == before + ROUNDS + 1

    # The same shapes with a start-by a minute ahead are computed; so is a request without a start-by.
    cpu = cpu_seconds(pid)
    for attempt in range(ROUNDS):
        served = http.infer(
            service,
            rows_input(httpclient, service, long_texts(BATCH_SIZE, length, f"on time {attempt} ")),
            parameters={START_BY_PARAMETER: now_us() + 60_000_000},
        )
        assert served.as_numpy("tokens").ravel().tolist() == [length] * BATCH_SIZE
    served_cpu = cpu_seconds(pid) - cpu
    without = grpc.infer(service, rows_input(grpcclient, service, ["no start-by"]))
    assert without.as_numpy("tokens").shape == (1, 1)
    assert expired_count(triton, service) == before + ROUNDS + 1
    # CPU time, not wall time: a busy machine does not inflate it. Measured: the expired rounds 0-0.01 s, the
    # served ones 0.25-1 s (the tiny cross-encoder's batch ~0.1 s, MiniLM's ~0.3 s); /proc counts 10 ms ticks.
    assert served_cpu >= 0.1, f"the served batches cost {served_cpu:.3f} s of CPU: too little to compare"
    assert expired_cpu <= served_cpu / 4, f"expired: {expired_cpu:.3f} s of CPU, served: {served_cpu:.3f} s"
    http.close()
    grpc.close()


@pytest.mark.integration
def test_embedding_computes_texts_again_when_they_were_last_sent_expired(triton: Any) -> None:
    """Triton 2.51's response cache stores whatever response a request got, an error included, as an answer with
    no outputs: with `response_cache` on, an expired request would leave its texts answered empty for good."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(triton.http_address)
    texts = ["sent late once", "then on time"]
    with pytest.raises(InferenceServerException):
        http.infer(
            "embedding_service",
            rows_input(httpclient, "embedding_service", texts),
            parameters={START_BY_PARAMETER: now_us() - 1},
        )
    again = http.infer("embedding_service", rows_input(httpclient, "embedding_service", texts))
    embedding = again.as_numpy("embedding")
    assert embedding is not None, f"answered without outputs: {again.get_response()}"
    assert embedding.shape == (2, 384)
    http.close()


@pytest.mark.integration
@pytest.mark.parametrize("service", ["warm_embedding", "warm_reranker"])
def test_encoder_first_full_batch_after_start_runs_warm(triton: Any, service: str) -> None:
    """onnxruntime's first two runs of a new largest shape each grow its arena by the whole activation size, and
    that allocation is what makes them slow. Peak RSS, unlike wall time, does not depend on how busy the machine
    is: the first full batch after start must not raise the stub's peak (without the warm-up it rises by ~100 MB
    for MiniLM 16 x 256, ~75 MB for the cross-encoder 16 x 512)."""
    import tritonclient.http as httpclient

    length = MAX_LENGTH[MODEL[service]]
    log = triton.log_path.read_text(errors="replace")
    assert f"{service}: warmed up on {BATCH_SIZE} rows of {length} tokens in " in log

    http = httpclient.InferenceServerClient(triton.http_address)
    pid = stub_pid(triton, service)
    peaks, seconds = [peak_rss_mib(pid)], []
    for attempt in range(3):  # the first, and two more for the record: their times go in the failure message
        texts = long_texts(BATCH_SIZE, length, f"client {attempt} ")
        started = time.perf_counter()
        result = http.infer(service, rows_input(httpclient, service, texts))
        seconds.append(time.perf_counter() - started)
        peaks.append(peak_rss_mib(pid))
        assert result.as_numpy("tokens").ravel().tolist() == [length] * BATCH_SIZE
    growth, timings = peaks[1] - peaks[0], ", ".join(f"{took:.3f}" for took in seconds)
    assert growth < 16, f"the first full batch raised the stub's peak RSS by {growth:.0f} MiB (took {timings} s)"
    http.close()
