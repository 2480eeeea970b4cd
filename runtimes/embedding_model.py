"""Triton Python-backend model of an embedding service; the compiler copies it to ``<service>/1/model.py``.

Every row of every request in one ``execute`` (Triton's dynamic batch) goes through one OnnxEncoder call, but a
request whose start-by (``START_BY_PARAMETER``) has passed is answered UNAVAILABLE first and not computed. The
batch is stopped at the service's inference_timeout, or when all its clients went away (``Stopper``).
Tensor contract: ``EMBEDDING_INPUTS`` / ``EMBEDDING_OUTPUTS`` in ``runtimes/signatures.py``.
"""

from __future__ import annotations

from typing import Any

from runtimes._triton import (
    Expiry,
    Stopper,
    encoder_responses,
    load_encoder,
    model_parameters,
    request_strings,
    warm_up,
)
from runtimes.encoders import long_texts
from runtimes.signatures import EMBEDDING, TEXT


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.encoder = load_encoder(args)
        self.expiry = Expiry(args["model_name"])
        self.stopper = Stopper(args["model_name"], model_parameters(args).inference_timeout_s)
        # Not watched: the warm-up's two runs of the largest input may take longer than inference_timeout.
        warm_up(args, lambda rows: self.encoder.encode_texts(long_texts(rows, self.encoder.max_length)))

    def finalize(self) -> None:
        self.stopper.close()

    def execute(self, requests: list[Any]) -> list[Any]:
        return self.expiry.serve(requests, self._embed)

    def _embed(self, requests: list[Any]) -> list[Any]:
        return encoder_responses(
            requests, lambda request: request_strings(request, TEXT), self.encoder.encode_texts, EMBEDDING, self.stopper
        )
