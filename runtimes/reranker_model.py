"""Triton Python-backend model of a reranker service; the compiler copies it to ``<service>/1/model.py``.

Rows are (query, document) pairs. The exported graph says how they are scored: a cross-encoder's graph returns
``score`` (one relevance logit per pair); a sentence-embedding model's returns ``embedding``, and a pair scores the
cosine of its two embeddings. A request whose start-by (``START_BY_PARAMETER``) has passed is answered UNAVAILABLE
and not computed; a batch is stopped at the service's inference_timeout, or when all its clients went away
(``Stopper``). Tensor contract: ``RERANKER_INPUTS`` / ``RERANKER_OUTPUTS`` in ``runtimes/signatures.py``.
"""

from __future__ import annotations

from functools import partial
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
from runtimes.encoders import Encoded, cosine_scores, long_texts
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
        self.expiry = Expiry(args["model_name"])
        self.stopper = Stopper(args["model_name"], model_parameters(args).inference_timeout_s)
        warm_up(args, self._score_long_pairs)  # not watched: it may take longer than inference_timeout

    def finalize(self) -> None:
        self.stopper.close()

    def execute(self, requests: list[Any]) -> list[Any]:
        return self.expiry.serve(
            requests, lambda live: encoder_responses(live, _pairs, self.score, SCORE, self.stopper)
        )

    def _score_long_pairs(self, rows: int) -> Encoded:
        """``rows`` pairs of a query and a document of max_length tokens each, all distinct: the largest input."""
        length = self.encoder.max_length
        queries, documents = long_texts(rows, length, "query "), long_texts(rows, length, "document ")
        return self.score(list(zip(queries, documents, strict=True)))
