"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import copy
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

MINIMAL: dict[str, Any] = {
    "models": {"emb": {"type": "embedding", "model_name": "some/model"}},
    "services": {"svc": {"model": "emb"}},
}


def config_with(changes: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (MINIMAL) with dotted paths set; a value of ``...`` deletes the key."""
    data = copy.deepcopy(base if base is not None else MINIMAL)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def write_yaml(directory: Path, data: Any, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def demo_config(models: dict[str, Path]) -> dict[str, Any]:
    """The three service types on the demo models, in the layered form."""
    return {
        "models": {
            "embedding_v1": {"type": "embedding", "model_name": str(models["all-MiniLM-L6-v2"])},
            "reranker_v1": {"type": "reranker", "model_name": str(models["tiny-cross-encoder"])},
            "llm_v1": {"type": "llm", "model_name": str(models["tiny-llm"]), "max_length": 256},
        },
        "services": {
            "embedding_service": {"model": "embedding_v1", "runtime": {"worker_count": 2}},
            "reranker_service": {"model": "reranker_v1", "runtime": {"worker_count": 1}},
            "llm_service": {"model": "llm_v1"},
        },
    }


def metrics_text(url: str) -> str:
    """A Prometheus endpoint's text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample whose labels include ``labels`` (0 when absent)."""
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            return float(match.group(2))
    return 0.0


@contextlib.contextmanager
def compiled_triton(root: Path, config: dict[str, Any], export_cache: Path) -> Iterator[tuple[Any, Path]]:
    """``config`` compiled into ``root/model_repository`` and served by a real tritonserver on free loopback ports:
    the server and the repository, until the block ends."""
    from compiler.pipeline import compile_repository
    from compiler.schema import Server
    from sluice.triton_server import TritonServer, TritonSettings, free_ports

    repository = root / "model_repository"
    compile_repository(write_yaml(root, config), repository, cache_root=export_cache)
    http_port, grpc_port, metrics_port = free_ports(3)
    server = Server(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    with TritonServer(TritonSettings(repository, root / "work", server), startup_timeout=240) as triton:
        yield triton, repository
