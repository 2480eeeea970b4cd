"""Sluice: one scheduling-aware front door for embedding, reranker and LLM services on Triton."""

import tomllib
from importlib import metadata
from pathlib import Path


def _version() -> str:
    """The installed package's version; from pyproject.toml beside the sources when the package is not installed
    (a checkout run in place)."""
    try:
        return metadata.version("sluice")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
