"""`sluice pull` and a Hub id's way from the Hugging Face cache into a compile, as a user runs them (subprocesses,
so huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE as it does for a user). Nothing is downloaded: the cache
is laid out by hand (tests/hub_cache.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from compiler.hub import weights_patterns
from sluice.demo_models import minilm_source
from sluice.triton_server import free_ports
from tests.fake_hub import FakeHub
from tests.helpers import write_yaml
from tests.hub_cache import lay_out_in_hub_cache

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def sluice(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``sluice *args`` in ``cwd`` with ``env`` added to an environment cleared of every HF_* variable."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args], cwd=cwd, env={**base, "COLUMNS": "200", **env},
        capture_output=True, text=True, timeout=600, check=False,
    )


def embedding_config(directory: Path, model_name: str) -> Path:
    return write_yaml(directory, {
        "models": {"embedding_v1": {"type": "embedding", "model_name": model_name}},
        "services": {
            "embedding_service": {"model": "embedding_v1", "runtime": {"max_queue_size": 50, "worker_count": 1}},
        },
    })


def files_under(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_pull_finds_a_cached_hub_id_without_downloading_and_compile_resolves_it_when_offline(
    tmp_path: Path, export_cache: Path
) -> None:
    cache = tmp_path / "hf"
    snapshot = lay_out_in_hub_cache(cache, MINILM_ID, minilm_source())
    before = files_under(cache)
    embedding_config(tmp_path, MINILM_ID)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "SLUICE_CACHE_DIR": str(export_cache)}

    pulled = sluice(tmp_path, "pull", "config.yaml", **env)
    assert pulled.returncode == 0, pulled.stderr
    assert f"{MINILM_ID}: already in the HF cache: {snapshot}" in pulled.stdout
    assert files_under(cache) == before  # nothing fetched, nothing written

    compiled = sluice(tmp_path, "compile", "config.yaml", "-o", "repo", **env)
    assert compiled.returncode == 0, compiled.stderr
    assert f"loading {MINILM_ID}" in compiled.stderr or f"{MINILM_ID}: using cached" in compiled.stderr
    assert snapshot.name not in compiled.stderr  # a snapshot is named by its repo id, not its commit
    artifacts = tmp_path / "repo" / "embedding_service" / "1" / "artifacts"
    assert (artifacts / "model.onnx").is_file() and (artifacts / "tokenizer.json").is_file()
    assert (artifacts / "config.json").read_bytes() == (minilm_source() / "config.json").read_bytes()


def test_pull_downloads_only_the_files_sluice_reads_and_compile_finds_them_when_the_hub_answers(
    tmp_path: Path, export_cache: Path
) -> None:
    # A repository as the Hub has them: safetensors and the same weights as PyTorch pickles, an ONNX copy, a README.
    repository = tmp_path / "on-the-hub"
    shutil.copytree(minilm_source(), repository)
    (repository / "pytorch_model.bin").write_bytes(b"pickled weights")
    (repository / "onnx").mkdir(exist_ok=True)
    (repository / "onnx" / "model.onnx").write_bytes(b"an onnx copy")
    (repository / "README.md").write_text("a model card", encoding="utf-8")
    embedding_config(tmp_path, "BAAI/bge-small-en-v1.5")
    cache = tmp_path / "hf"
    with FakeHub({"BAAI/bge-small-en-v1.5": repository}) as hub:
        first = sluice(tmp_path, "pull", "config.yaml", HF_HUB_CACHE=str(cache), HF_ENDPOINT=hub.url)
        fetched = sorted(name.removeprefix("BAAI/bge-small-en-v1.5/") for name in hub.downloaded)
        again = sluice(tmp_path, "pull", "config.yaml", HF_HUB_CACHE=str(cache), HF_ENDPOINT=hub.url)
        downloads_after_the_second_pull = len(hub.downloaded)
    assert first.returncode == 0, first.stderr
    assert "model.safetensors" in fetched and "1_Pooling/config.json" in fetched and "vocab.txt" in fetched
    assert not {"pytorch_model.bin", "onnx/model.onnx", "README.md"} & set(fetched)
    assert f"BAAI/bge-small-en-v1.5: fetching {len(fetched)} of {len(fetched)} files" in first.stderr
    assert f"BAAI/bge-small-en-v1.5: fetched {len(fetched)} files (" in first.stdout
    assert again.returncode == 0 and "already in the HF cache" in again.stdout
    assert downloads_after_the_second_pull == len(fetched)

    compiled = sluice(tmp_path, "compile", "config.yaml", "-o", "repo", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
                      SLUICE_CACHE_DIR=str(export_cache))
    assert compiled.returncode == 0, compiled.stderr
    assert (tmp_path / "repo" / "embedding_service" / "1" / "artifacts" / "model.onnx").is_file()


def test_pull_says_hf_hub_offline_is_set_when_a_hub_id_is_missing_offline(tmp_path: Path) -> None:
    embedding_config(tmp_path, "BAAI/bge-small-en-v1.5")
    result = sluice(tmp_path, "pull", "config.yaml", HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "models.embedding_v1: cannot download 'BAAI/bge-small-en-v1.5'" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr and "hf download BAAI/bge-small-en-v1.5" in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_says_the_hub_cannot_be_reached_when_there_is_no_network(tmp_path: Path) -> None:
    embedding_config(tmp_path, "BAAI/bge-small-en-v1.5")
    (closed_port,) = free_ports(1)  # nothing listens there: connection refused, as with no network
    endpoint = f"http://127.0.0.1:{closed_port}"
    result = sluice(tmp_path, "pull", "config.yaml", HF_HUB_CACHE=str(tmp_path / "hf"), HF_ENDPOINT=endpoint)
    assert result.returncode == 1
    assert f"cannot download 'BAAI/bge-small-en-v1.5': {endpoint} could not be reached" in result.stderr
    assert "hf download BAAI/bge-small-en-v1.5" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "hf" / "models--BAAI--bge-small-en-v1.5" / "snapshots").exists()


def test_pull_says_the_model_is_not_on_the_hub_when_the_hub_has_no_such_repository(tmp_path: Path) -> None:
    embedding_config(tmp_path, "models/all-MiniLM-L6-v2")  # the demo's directory, not made yet: also a Hub id
    with FakeHub({}) as hub:
        result = sluice(tmp_path, "pull", "config.yaml", HF_HUB_CACHE=str(tmp_path / "hf"), HF_ENDPOINT=hub.url)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "'models/all-MiniLM-L6-v2' is not a model on the Hugging Face Hub" in message
    assert "`sluice models` makes the demo models" in message and "Traceback" not in message


def test_pull_leaves_a_model_directory_alone_when_model_name_is_a_path(tmp_path: Path) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    embedding_config(tmp_path, "models/mine")
    result = sluice(tmp_path, "pull", "config.yaml", HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert f"models/mine: a local directory: {tmp_path / 'models' / 'mine'}" in result.stdout
    assert not (tmp_path / "hf").exists()


def test_compile_says_how_to_get_a_hub_model_when_it_is_not_in_the_cache(tmp_path: Path) -> None:
    embedding_config(tmp_path, "BAAI/bge-small-en-v1.5")
    cache = tmp_path / "hf"
    result = sluice(tmp_path, "compile", "config.yaml", "-o", "repo", HF_HUB_CACHE=str(cache))
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    for words in (
        "model 'BAAI/bge-small-en-v1.5' was not found locally",
        f"the Hugging Face cache ({cache}) has no snapshot of it",
        "sluice pull config.yaml",
        "hf download BAAI/bge-small-en-v1.5 #",
        "hf download BAAI/bge-small-en-v1.5 --local-dir models/bge-small-en-v1.5",
        "then model_name: models/bge-small-en-v1.5",
        "A local directory works too",
    ):
        assert words in message, words
    assert not (tmp_path / "repo").exists()


def test_weights_patterns_fetch_only_safetensors_when_a_repository_also_has_pytorch_weights() -> None:
    both = weights_patterns(["config.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx"])
    assert "*.safetensors" in both and not any(".bin" in pattern for pattern in both)
    legacy = weights_patterns(["config.json", "pytorch_model.bin"])
    assert "pytorch_model*.bin" in legacy and "*.safetensors" not in legacy
    assert not any("onnx" in pattern for pattern in both + legacy)


def test_compile_copies_files_not_cache_symlinks_when_an_llm_is_served_from_the_hf_cache(
    tmp_path: Path, demo_models: dict[str, Path]
) -> None:
    cache = tmp_path / "hf"
    lay_out_in_hub_cache(cache, "Qwen/Qwen2.5-0.5B-Instruct", demo_models["tiny-llm"])
    write_yaml(tmp_path, {
        "models": {"llm_v1": {"type": "llm", "model_name": "Qwen/Qwen2.5-0.5B-Instruct"}},
        "services": {"llm_service": {"model": "llm_v1", "runtime": {"max_queue_size": 30}}},
    })
    result = sluice(tmp_path, "compile", "config.yaml", "-o", "repo", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    artifacts = tmp_path / "repo" / "llm_service" / "1" / "artifacts"
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert not (artifacts / name).is_symlink(), name
        assert (artifacts / name).read_bytes() == (demo_models["tiny-llm"] / name).read_bytes(), name
