"""The encoder runtimes without Triton: ordering, bucketing, truncation and cosine scoring on the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.export import export_cached
from runtimes.encoders import OnnxEncoder, _buckets, cosine_scores, open_session


@pytest.fixture(scope="module")
def encoder(demo_models: dict[str, Path], export_cache: Path) -> OnnxEncoder:
    artifacts, _ = export_cached(
        "embedding", demo_models["all-MiniLM-L6-v2"], max_length=256, cache_root=export_cache
    )
    return OnnxEncoder(artifacts, 32, open_session(artifacts / "model.onnx", threads=2))


def test_buckets_start_a_new_call_when_a_row_is_more_than_twice_as_long() -> None:
    lengths = np.array([3, 5, 9, 16, 17, 30, 200], dtype=np.int32)
    assert _buckets(lengths) == [slice(0, 4), slice(4, 6), slice(6, 7)]
    assert _buckets(np.array([], dtype=np.int32)) == []


def test_encode_texts_keeps_the_callers_order_when_lengths_force_several_calls(encoder: OnnxEncoder) -> None:
    texts = ["word " * 30, "hi", "a medium sized sentence about nothing", "hi"]
    together = encoder.encode_texts(texts).values
    alone = np.concatenate([encoder.encode_texts([text]).values for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together[1], together[3], atol=1e-6)


def test_encode_texts_reports_truncation_when_text_exceeds_max_length(encoder: OnnxEncoder) -> None:
    encoded = encoder.encode_texts(["word " * 100, "short text"])
    assert encoded.truncated.tolist() == [True, False]
    assert encoded.tokens.tolist() == [32, 4]


def test_encode_texts_returns_empty_arrays_when_given_no_rows(encoder: OnnxEncoder) -> None:
    encoded = encoder.encode_texts([])
    assert encoded.values.shape[0] == 0 and encoded.tokens.shape == (0,)


def test_cosine_scores_rank_the_relevant_document_first_when_one_matches(encoder: OnnxEncoder) -> None:
    query = "how do plants make food"
    pairs = [(query, "The stock exchange closed early."), (query, "Photosynthesis turns light into sugar in leaves.")]
    scores = cosine_scores(encoder, pairs)
    assert scores.values[1] > scores.values[0]
    assert scores.tokens.tolist() == [
        encoder.encode_texts([query]).tokens[0] + encoder.encode_texts([pairs[0][1]]).tokens[0],
        encoder.encode_texts([query]).tokens[0] + encoder.encode_texts([pairs[1][1]]).tokens[0],
    ]
