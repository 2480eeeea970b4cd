"""Embeddings and rerank scores: per-item cache first, then Triton for the misses, as chunks of at most
``batch_size`` rows queued in the service's batcher (batcher.py: refused on arrival when they cannot be served in
time, sent as batches with other clients' chunks), reassembled in order.

Cached value of one item: int32 token count, one truncation byte, then float32 values (the embedding, or one
score).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from starlette.requests import Request

from runtimes.signatures import DOCUMENT, EMBEDDING, QUERY, SCORE, TEXT, TOKENS, TRUNCATED

from .admission import Call
from .cache import item_keys, key_namespace
from .triton import text_column

if TYPE_CHECKING:
    from .state import Gateway


@dataclass(frozen=True)
class Encoded:
    values: npt.NDArray[np.float32]  # [items, dim] or [items] scores
    tokens: npt.NDArray[np.int32]
    truncated: npt.NDArray[np.bool_]
    hits: int


@functools.lru_cache(maxsize=64)
def _namespace(service: str, fingerprint: str, route_type: str) -> bytes:
    """The cache key namespace of a route: the same for every request, so built once."""
    return key_namespace(service, fingerprint, {"type": route_type})


def _pack(tokens: int, truncated: bool, values: npt.NDArray[np.float32]) -> bytes:
    return np.int32(tokens).tobytes() + bytes([truncated]) + np.ascontiguousarray(values, np.float32).tobytes()


def _unpack(blob: bytes) -> tuple[int, bool, npt.NDArray[np.float32]]:
    return int(np.frombuffer(blob[:4], np.int32)[0]), bool(blob[4]), np.frombuffer(blob[5:], np.float32)


async def encode(
    gateway: Gateway,
    call: Call,
    items: Sequence[tuple[str, ...]],
    use_cache: bool,
) -> Encoded:
    """Embeddings (items of one text) or scores (items of a query and a document), in the items' order."""
    route = call.route
    cached: list[bytes | None] = [None] * len(items)
    keys: list[str] = []
    caching = route.enable_cache and gateway.cache is not None
    if caching:
        keys = item_keys(_namespace(route.service, route.fingerprint, route.type), ["\0".join(item) for item in items])
        if use_cache:
            cached = await gateway.cache.get_many(keys)
    misses = [i for i, blob in enumerate(cached) if blob is None]
    fresh = await _infer(gateway, call, [items[i] for i in misses]) if misses else None
    if caching:
        metrics = gateway.metrics.of(route.service)
        metrics.cache_hits.inc(len(items) - len(misses))
        metrics.cache_misses.inc(len(misses))
    tokens = np.empty(len(items), np.int32)
    truncated = np.empty(len(items), np.bool_)
    rows: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(items)
    for i, blob in enumerate(cached):
        if blob is not None:
            tokens[i], truncated[i], rows[i] = _unpack(blob)
    if fresh is not None:
        fresh_tokens, fresh_truncated, fresh_values = fresh
        for j, i in enumerate(misses):
            tokens[i], truncated[i], rows[i] = fresh_tokens[j], fresh_truncated[j], fresh_values[j]
        if caching:
            await gateway.cache.set_many({
                keys[i]: _pack(int(fresh_tokens[j]), bool(fresh_truncated[j]), fresh_values[j])
                for j, i in enumerate(misses)
            })
    values = np.stack(rows) if route.type == "embedding" else np.concatenate(rows)
    return Encoded(values, tokens, truncated, len(items) - len(misses))


async def _infer(
    gateway: Gateway, call: Call, items: list[tuple[str, ...]]
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    route = call.route
    size = route.batch_size
    if route.type == "embedding":
        chunks = [{TEXT: text_column([item[0] for item in items[i : i + size]])} for i in range(0, len(items), size)]
    else:
        chunks = [{QUERY: text_column([item[0] for item in items[i : i + size]]),
                   DOCUMENT: text_column([item[1] for item in items[i : i + size]])}
                  for i in range(0, len(items), size)]
    started = time.monotonic()
    try:
        results = await gateway.batcher.infer(route, chunks, call.arrival, call.expires)
    finally:
        gateway.metrics.of(route.service).triton_latency.observe(time.monotonic() - started)
    value_name = EMBEDDING if route.type == "embedding" else SCORE
    return (
        _joined([r[TOKENS].reshape(-1) for r in results]).astype(np.int32, copy=False),
        _joined([r[TRUNCATED].reshape(-1) for r in results]).astype(np.bool_, copy=False),
        _joined([r[value_name] for r in results]).astype(np.float32, copy=False),
    )


def _joined(arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def cache_allowed(request: Request) -> bool:
    """``Cache-Control: no-cache`` (or no-store) makes the request skip the cache."""
    directives = request.headers.get("cache-control", "").lower()
    return "no-cache" not in directives and "no-store" not in directives


def cache_headers(hits: int, items: int) -> dict[str, str]:
    return {"x-sluice-cache-hits": str(hits), "x-sluice-cache-misses": str(items - hits)}
