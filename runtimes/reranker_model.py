"""Triton Python-backend model of a reranker service; the compiler copies it to ``<service>/1/model.py``.

Rows are (query, document) pairs. The exported graph says how they are scored: a cross-encoder's graph returns
``score`` (one relevance logit per pair); a sentence-embedding model's returns ``embedding``, and a pair scores the
cosine of its two embeddings. Tensor contract: ``RERANKER_INPUTS`` / ``RERANKER_OUTPUTS`` in ``runtimes/signatures.py``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from runtimes._triton import encoder_responses, load_encoder, request_strings
from runtimes.encoders import cosine_scores
from runtimes.signatures import DOCUMENT, EMBEDDING, QUERY, SCORE


def _pairs(request: Any) -> list[tuple[str, str]]:
    queries, documents = request_strings(request, QUERY), request_strings(request, DOCUMENT)
    if len(queries) != len(documents):
        raise ValueError(f"input 'query' has {len(queries)} rows but 'document' has {len(documents)}")
    return list(zip(queries, documents, strict=True))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.encoder = load_encoder(args)
        cosine = self.encoder.output_name == EMBEDDING
        self.score = partial(cosine_scores, self.encoder) if cosine else self.encoder.encode_pairs

    def execute(self, requests: list[Any]) -> list[Any]:
        return encoder_responses(requests, _pairs, self.score, SCORE)
