"""Deterministic benchmark texts: 8-24 words drawn from a fixed vocabulary with a fixed seed."""

from __future__ import annotations

import random

_WORDS = (
    "model serving batch queue latency throughput request client server embedding vector search document "
    "query relevance score ranking token context window stream cache memory core thread process network "
    "the a of to and in is for on with as by at from that this it be are was were can will would should "
    "quick brown fox jumps over lazy dog river mountain city music garden kitchen window morning evening "
    "data system user service deploy config timeout limit rate worker instance graph tensor runtime export"
).split()


def benchmark_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences of 8-24 words (distinct, so no cache can answer them)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible texts, not secrets
    texts = []
    for i in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 24))]
        texts.append(f"{' '.join(words)} #{i}")
    return texts
