"""Each service type's scheduling strategy, taken from the seed (shared/seeds/): what a service gets when it
names only its model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The nine runtime knobs, in the seed's order. Units: seconds for the four timeouts, requests/second for
# rate_limit.
RUNTIME_KNOBS: tuple[str, ...] = (
    "batch_size",
    "batch_timeout",
    "max_queue_size",
    "worker_count",
    "queue_timeout",
    "inference_timeout",
    "total_timeout",
    "rate_limit",
    "enable_cache",
)


def _strategy(*values: Any) -> dict[str, Any]:
    return dict(zip(RUNTIME_KNOBS, values, strict=True))


TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # High throughput, low compute: large batches, several workers, cached.
    "embedding": _strategy(64, 0.01, 500, 4, 0.05, 0.3, 0.5, 100, True),
    # Moderate compute: medium batches.
    "reranker": _strategy(16, 0.02, 200, 2, 0.1, 0.5, 0.8, 50, False),
    # Heavy compute: small batches, rate limited.
    "llm": _strategy(4, 0.05, 50, 1, 0.2, 2.0, 3.0, 10, False),
}


@dataclass(frozen=True)
class ResolvedRuntime:
    """A service's nine knobs with its type's defaults filled in; ``explicit`` names those the user set."""

    batch_size: int
    batch_timeout: float
    max_queue_size: int
    worker_count: int
    queue_timeout: float
    inference_timeout: float
    total_timeout: float
    rate_limit: float
    enable_cache: bool
    explicit: frozenset[str]


def resolve_runtime(model_type: str, overrides: dict[str, Any]) -> ResolvedRuntime:
    """Fill the knobs a service left out (None) with its model type's strategy."""
    given = {knob: value for knob, value in overrides.items() if value is not None}
    return ResolvedRuntime(**{**TYPE_DEFAULTS[model_type], **given}, explicit=frozenset(given))
