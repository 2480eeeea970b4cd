"""Triton Python-backend model of an embedding service; the compiler copies it to ``<service>/1/model.py``.

Every row of every request in one ``execute`` (Triton's dynamic batch) goes through one OnnxEncoder call.
Tensor contract: ``EMBEDDING_INPUTS`` / ``EMBEDDING_OUTPUTS`` in ``runtimes/signatures.py``.
"""

from __future__ import annotations

from typing import Any

from runtimes._triton import encoder_responses, gpu_device_id, model_parameters, request_strings, version_dir
from runtimes.encoders import OnnxEncoder, open_session, session_threads


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = model_parameters(args)
        artifacts = version_dir(args) / parameters["artifacts_dir"]
        threads = session_threads(int(parameters["intra_op_threads"]), int(parameters["worker_count"]))
        session = open_session(artifacts / "model.onnx", threads, gpu_device_id(args))
        self.encoder = OnnxEncoder(artifacts, int(parameters["max_length"]), session)

    def execute(self, requests: list[Any]) -> list[Any]:
        return encoder_responses(
            requests, lambda request: request_strings(request, "text"), self.encoder.encode_texts, "embedding"
        )
