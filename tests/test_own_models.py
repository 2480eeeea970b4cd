"""The README's "Your own models" walkthrough, followed as a user follows it, and the shipped config.yaml's first run.

The walkthrough's three Hub models cannot be downloaded here, so stand-ins are laid out under their ids in a
Hugging Face cache (tests/hub_cache.py) and huggingface_hub runs offline: a copy of the real all-MiniLM-L6-v2 as
BAAI/bge-small-en-v1.5, the tiny random-weight cross-encoder as cross-encoder/ms-marco-MiniLM-L-6-v2 and the tiny
random-weight Llama (a ChatML chat template, as Qwen's) as Qwen/Qwen2.5-0.5B-Instruct. Then `sluice pull`,
`sluice compile` and `sluice up` run as subprocesses, and one request goes to each service through the gateway.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from compiler.pipeline import build_plan
from sluice.demo_models import MINILM, TINY_CROSS_ENCODER, TINY_LLM
from sluice.triton_server import free_ports
from tests.helpers import write_yaml
from tests.hub_cache import lay_out_in_hub_cache
from tests.test_pull import sluice

ROOT = Path(__file__).parent.parent
# The walkthrough's models: section, replacing config.yaml's.
WALKTHROUGH_MODELS: dict[str, Any] = {
    "embedding_v1": {"type": "embedding", "model_name": "BAAI/bge-small-en-v1.5", "device": "cpu", "max_length": 256},
    "reranker_v1": {
        "type": "reranker", "model_name": "cross-encoder/ms-marco-MiniLM-L-6-v2", "device": "cpu", "max_length": 256,
    },
    "llm_v1": {
        "type": "llm", "model_name": "Qwen/Qwen2.5-0.5B-Instruct", "device": "cpu", "max_length": 2048,
        "max_tokens": 256,
    },
}
# The walkthrough's changes to config.yaml's llm_service for a real LLM on a CPU.
WALKTHROUGH_LLM_RUNTIME = {"queue_timeout": 5.0, "inference_timeout": 60.0, "total_timeout": 66.0, "rate_limit": 2}
STAND_INS = {
    "BAAI/bge-small-en-v1.5": MINILM,
    "cross-encoder/ms-marco-MiniLM-L-6-v2": TINY_CROSS_ENCODER,
    "Qwen/Qwen2.5-0.5B-Instruct": TINY_LLM,
}


def test_config_yaml_has_no_warnings_when_compiled() -> None:
    assert build_plan(ROOT / "config.yaml").warnings == []


def walkthrough_config() -> dict[str, Any]:
    """config.yaml with the walkthrough's models and LLM runtime, on free loopback ports."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    data["models"] = copy.deepcopy(WALKTHROUGH_MODELS)
    data["services"]["llm_service"]["runtime"].update(WALKTHROUGH_LLM_RUNTIME)
    http_port, grpc_port, metrics_port, gateway_port = free_ports(4)
    data["server"] = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    data["gateway"] = {"port": gateway_port}
    return data


@pytest.fixture
def walkthrough(tmp_path: Path, demo_models: dict[str, Path], export_cache: Path) -> tuple[Path, dict[str, str]]:
    """A directory holding the walkthrough's config.yaml, and the environment its commands run in."""
    cache = tmp_path / "hf"
    for repo_id, stand_in in STAND_INS.items():
        lay_out_in_hub_cache(cache, repo_id, demo_models[stand_in])
    write_yaml(tmp_path, walkthrough_config())
    return tmp_path, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "SLUICE_CACHE_DIR": str(export_cache)}


@pytest.mark.integration
def test_walkthrough_serves_each_own_model_when_followed_step_by_step(
    walkthrough: tuple[Path, dict[str, str]],
) -> None:
    directory, env = walkthrough
    pulled = sluice(directory, "pull", "config.yaml", **env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.count("already in the HF cache") == 3, pulled.stdout

    compiled = sluice(directory, "compile", "config.yaml", **env)
    assert compiled.returncode == 0, compiled.stderr
    assert "warning" not in compiled.stderr, compiled.stderr

    gateway = walkthrough_config_gateway(directory)
    with sluice_up(directory, env) as up:
        wait_ready(gateway, up, directory / "up.log")
        embedded = httpx.post(f"{gateway}/v1/embeddings", timeout=30,
                              json={"model": "embedding_service", "input": ["hello world"]})
        assert embedded.status_code == 200, embedded.text
        assert len(embedded.json()["data"][0]["embedding"]) == 384

        reranked = httpx.post(f"{gateway}/v1/rerank", timeout=30, json={
            "model": "reranker_service", "query": "what do cats eat", "documents": ["stocks fell", "cats eat fish"],
        })
        assert reranked.status_code == 200, reranked.text
        assert sorted(result["index"] for result in reranked.json()["results"]) == [0, 1]

        chat = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
            "model": "llm_service", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        })
        assert chat.status_code == 200, chat.text
        events = [line.removeprefix("data: ") for line in chat.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in event for event in events), chat.text
        assert any('"content"' in event for event in events[:-1]), chat.text


def walkthrough_config_gateway(directory: Path) -> str:
    data = yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8"))
    return f"http://127.0.0.1:{data['gateway']['port']}"


@contextlib.contextmanager
def sluice_up(directory: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``sluice up config.yaml`` in ``directory`` (its output in up.log) until the block ends: then SIGINT, as
    Ctrl-C, and it must stop."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    with (directory / "up.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sluice", "up", "config.yaml"], cwd=directory,
            env={**base, "COLUMNS": "200", **env}, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()


def wait_ready(gateway: str, up: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and up.poll() is None:
        try:
            if httpx.get(f"{gateway}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"sluice up was not ready at {gateway}:\n{log.read_text(encoding='utf-8', errors='replace')}")
