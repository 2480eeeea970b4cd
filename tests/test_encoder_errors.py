"""Bad input sent straight to an embedding or reranker model is the client's fault: Triton's INVALID_ARG, which
its HTTP API answers with 400 (not 500, an internal error), as it already was for the LLM."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtimes.encoders import Encoded
from tests.fake_pb_utils import FakeTritonError, runtime_helpers
from tests.helpers import compiled_triton

# --- runtimes/_triton.py against a fake triton_python_backend_utils ----------------------------------------------


@pytest.fixture
def triton_helpers(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    yield from runtime_helpers(monkeypatch)


def test_encoder_responses_answer_invalid_arg_only_to_the_bad_request_when_one_is_not_utf8(
    triton_helpers: types.ModuleType,
) -> None:
    good, bad = {"text": np.array([[b"hello"]], np.object_)}, {"text": np.array([[b"\xff\xfe"]], np.object_)}

    def run(texts: list[str], watched: object) -> Encoded:
        assert texts == ["hello"]
        return Encoded(np.ones((1, 2), np.float32), np.array([1], np.int32), np.array([False]))

    stopper = triton_helpers.Stopper("embedding_service", 0)
    try:
        served, refused = triton_helpers.encoder_responses(
            [good, bad], lambda request: triton_helpers.request_strings(request, "text"), run, "embedding", stopper
        )
    finally:
        stopper.close()
    assert served.error is None
    assert [name for name, _ in served.output_tensors] == ["embedding", "tokens", "truncated"]
    assert refused.error.code == FakeTritonError.INVALID_ARG
    assert refused.error.message == "input 'text' is not valid UTF-8"


# --- inside the real tritonserver -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path
) -> Iterator[str]:
    """A compiled repository of one embedding and one reranker service on tritonserver; its HTTP address."""

    root = tmp_path_factory.mktemp("encoders")
    config = {
        "models": {
            "minilm": {"type": "embedding", "model_name": str(demo_models["all-MiniLM-L6-v2"])},
            "cross_encoder": {"type": "reranker", "model_name": str(demo_models["tiny-cross-encoder"])},
        },
        "services": {
            "embedding_service": {"model": "minilm", "runtime": {"worker_count": 1}},
            "reranker_service": {"model": "cross_encoder", "runtime": {"worker_count": 1}},
        },
    }
    with compiled_triton(root, config, export_cache) as (server, _):
        yield server.http_address


def raw_bytes_input(name: str, rows: list[bytes]) -> Any:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, [len(rows), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[row] for row in rows], dtype=np.object_), binary_data=True)
    return tensor


@pytest.mark.integration
@pytest.mark.parametrize(
    ("service", "inputs", "named"),
    [
        ("embedding_service", {"text": [b"ok", b"\xff\xfe"]}, "text"),
        ("reranker_service", {"query": [b"\xc3("], "document": [b"a document"]}, "query"),
    ],
)
def test_encoder_model_answers_400_naming_the_input_when_sent_bad_input_over_http(
    encoders: str, service: str, inputs: dict[str, list[bytes]], named: str
) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(encoders)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(service, [raw_bytes_input(name, rows) for name, rows in inputs.items()])
    assert refused.value.status() == "400"
    assert f"input '{named}' is not valid UTF-8" in str(refused.value.message())
    # The same service still answers good input.
    good = {name: [b"fine"] * len(rows) for name, rows in inputs.items()}
    assert client.infer(service, [raw_bytes_input(name, rows) for name, rows in good.items()]).get_response()
    client.close()
