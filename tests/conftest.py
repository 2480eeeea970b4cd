"""Fixtures shared across test modules: the demo models and one export cache per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.demo_models import materialise


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real all-MiniLM-L6-v2 and the tiny random-weight models, built once per session (no downloads)."""
    return materialise(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the session, so each model is exported once."""
    return tmp_path_factory.mktemp("export-cache")
