"""Fixtures shared across test modules: the demo models and one export cache per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.demo_models import materialise
from tests.redis_server import REDIS_SERVER, running_redis


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real all-MiniLM-L6-v2 and the tiny random-weight models, built once per session (no downloads)."""
    return materialise(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the session, so each model is exported once."""
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One real redis-server for the session; tests keep apart by their own keys and buckets."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server (.ci/run does)")
    with running_redis() as url:
        yield url
