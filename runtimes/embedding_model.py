"""Triton Python-backend model of an embedding service; the compiler copies it to ``<service>/1/model.py``.

Every row of every request in one ``execute`` (Triton's dynamic batch) goes through one OnnxEncoder call.
Tensor contract: ``EMBEDDING_INPUTS`` / ``EMBEDDING_OUTPUTS`` in ``runtimes/signatures.py``.
"""

from __future__ import annotations

from typing import Any

from runtimes._triton import encoder_responses, load_encoder, request_strings
from runtimes.signatures import EMBEDDING, TEXT


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.encoder = load_encoder(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        return encoder_responses(
            requests, lambda request: request_strings(request, TEXT), self.encoder.encode_texts, EMBEDDING
        )
