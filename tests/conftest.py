"""Fixtures shared across test modules: the demo models and one export cache per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama + tokenizer of tests/tiny_llm.py, laid out as a compiled LLM service: <model>/1/hf."""
    from tests.tiny_llm import save_tiny_llm  # torch and transformers: only for the tests that use it

    return save_tiny_llm(tmp_path_factory.mktemp("llm") / "1" / "hf")


@pytest.fixture(scope="session")
def generator(model_dir: Path) -> Any:
    """A BatchGenerator over the tiny Llama: max_length 128, default_max_tokens 12."""
    from runtimes.llm import load_generator

    return load_generator(model_dir, threads=2, max_length=128, default_max_tokens=12)
