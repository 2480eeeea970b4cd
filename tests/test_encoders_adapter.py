"""``gateway.encoders.encode`` (cache, chunking, reassembly) against a fake batcher: no tritonserver.

(tests/test_encoders.py tests runtimes/encoders.py, the models' side.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.admission import Call
from gateway.cache import MemoryCache
from gateway.encoders import Encoded, encode
from gateway.metrics import GatewayMetrics
from runtimes.signatures import output_names
from sluice.manifest import Route
from tests.gateway_fakes import route


def embedding_of(text: str) -> list[float]:
    return [float(len(text)), float(ord(text[0]))]


def score_of(query: str, document: str) -> float:
    return len(query) + len(document) / 100


class FakeBatcher:
    """``Batcher.infer`` answering each row from its text (see embedding_of, score_of); records the rows of every
    chunk it receives."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, ...]]] = []

    async def infer(self, route: Route, chunks: Sequence[Mapping[str, npt.NDArray[Any]]], arrival: float,
                    finish_by: float) -> list[dict[str, Any]]:
        return [self._answer(route, inputs) for inputs in chunks]

    def _answer(self, route: Route, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
        columns = [[value.decode() for value in inputs[name].reshape(-1)] for name in inputs]
        items = list(zip(*columns, strict=True))
        assert len(items) <= route.batch_size
        self.calls.append(items)
        values = {
            "embedding": np.array([embedding_of(item[0]) for item in items], np.float32),
            "score": np.array([[score_of(*item)] for item in items if len(item) == 2], np.float32),
            "tokens": np.array([[len("".join(item))] for item in items], np.int32),
            "truncated": np.array([[len("".join(item)) > 4] for item in items], np.bool_),
        }
        return {name: values[name] for name in output_names(route.type)}


def fake_gateway() -> Any:
    return SimpleNamespace(batcher=FakeBatcher(), cache=MemoryCache(100), metrics=None)


def encode_all(gateway: Any, service_route: Any, *requests: tuple[list[tuple[str, ...]], bool]) -> list[Encoded]:
    """Each (items, use_cache) encoded in turn."""
    gateway.metrics = GatewayMetrics([service_route])

    async def scenario() -> list[Encoded]:
        call = Call(service_route, time.monotonic(), time.monotonic() + 10)
        return [await encode(gateway, call, items, use_cache) for items, use_cache in requests]

    return asyncio.run(scenario())


def texts(*values: str) -> list[tuple[str, ...]]:
    return [(value,) for value in values]


def test_encode_sends_chunks_of_batch_size_and_answers_in_item_order_when_over_batch_size() -> None:
    gateway = fake_gateway()
    items = texts("a", "bb", "ccc", "dddd", "eeeee")
    (encoded,) = encode_all(gateway, route("emb", "embedding", batch_size=2), (items, True))
    assert gateway.batcher.calls == [items[0:2], items[2:4], items[4:]]
    np.testing.assert_array_equal(encoded.values, [embedding_of(text) for (text,) in items])
    assert encoded.tokens.tolist() == [1, 2, 3, 4, 5]
    assert encoded.truncated.tolist() == [False, False, False, False, True]
    assert encoded.hits == 0


def test_encode_answers_cached_items_and_sends_only_the_misses_when_some_are_cached() -> None:
    gateway = fake_gateway()
    service = route("emb", "embedding", enable_cache=True)
    first, second = encode_all(gateway, service, (texts("one", "twotwo"), True), (texts("twotwo", "new", "one"), True))
    assert gateway.batcher.calls == [texts("one", "twotwo"), texts("new")]
    assert second.hits == 2
    np.testing.assert_array_equal(second.values, [embedding_of(t) for t in ("twotwo", "new", "one")])
    assert second.tokens.tolist() == [6, 3, 3] and second.truncated.tolist() == [True, False, False]
    registry = gateway.metrics.registry
    assert registry.get_sample_value("sluice_gateway_cache_hits_total", {"service": "emb"}) == 2
    assert registry.get_sample_value("sluice_gateway_cache_misses_total", {"service": "emb"}) == 3
    assert first.hits == 0


def test_encode_sends_every_item_but_still_stores_them_when_the_request_skips_the_cache() -> None:
    gateway = fake_gateway()
    service = route("emb", "embedding", enable_cache=True)
    items = texts("x", "y")
    _, skipped, cached = encode_all(gateway, service, (items, True), (items, False), (items, True))
    assert gateway.batcher.calls == [items, items]
    assert (skipped.hits, cached.hits) == (0, 2)
    np.testing.assert_array_equal(skipped.values, cached.values)


def test_encode_sends_repeated_items_again_when_the_route_disables_the_cache() -> None:
    gateway = fake_gateway()
    items = texts("x", "y")
    _, again = encode_all(gateway, route("emb", "embedding", enable_cache=False), (items, True), (items, True))
    assert gateway.batcher.calls == [items, items] and again.hits == 0


def test_encode_scores_query_document_pairs_in_item_order_when_reranking() -> None:
    gateway = fake_gateway()
    pairs = [("q", "d1"), ("q", "doc2"), ("q", "document3")]
    service = route("rank", "reranker", batch_size=2, enable_cache=True)
    first, again = encode_all(gateway, service, (pairs, True), ([pairs[2], ("q", "new")], True))
    assert gateway.batcher.calls == [pairs[:2], pairs[2:], [("q", "new")]]
    assert first.values.shape == (3,)
    np.testing.assert_allclose(first.values, [score_of(*pair) for pair in pairs])
    np.testing.assert_allclose(again.values, [score_of(*pairs[2]), score_of("q", "new")])
    assert again.hits == 1
