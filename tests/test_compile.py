"""Writing the repository: both config forms agree, output is deterministic, writes are atomic, and every
service gets its runtime and model files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compiler import write as write_module
from compiler.pipeline import compile_repository
from sluice.errors import CompileError, ConfigError
from tests.helpers import config_with, demo_config, tree, write_yaml


@pytest.fixture
def compile_into(export_cache: Path) -> Any:
    def run(config: Path, out: Path, progress: Any = None) -> Any:
        return compile_repository(config, out, cache_root=export_cache, progress=progress)

    return run


@pytest.fixture
def minimal(demo_models: dict[str, Path]) -> dict[str, Any]:
    return config_with({"models.emb.model_name": str(demo_models["all-MiniLM-L6-v2"])})


def test_compile_repository_writes_runtime_and_model_files_when_models_exist(
    tmp_path: Path, demo_models: dict[str, Path], compile_into: Any
) -> None:
    out = tmp_path / "repo"
    compile_into(write_yaml(tmp_path, demo_config(demo_models)), out)
    files = tree(out).keys()
    for service in ("embedding_service", "reranker_service", "llm_service"):
        assert f"{service}/config.pbtxt" in files
        assert f"{service}/1/model.py" in files
        assert f"{service}/1/runtimes/signatures.py" in files
    assert "embedding_service/1/artifacts/model.onnx" in files
    assert "embedding_service/1/artifacts/tokenizer.json" in files
    assert "reranker_service/1/artifacts/model.onnx" in files
    assert "llm_service/1/artifacts/model.safetensors" in files
    model_py = (out / "llm_service/1/model.py").read_bytes()
    assert model_py == (Path(__file__).parent.parent / "runtimes/llm_model.py").read_bytes()


def test_compile_repository_gives_identical_bytes_when_run_twice(
    tmp_path: Path, demo_models: dict[str, Path], compile_into: Any
) -> None:
    config = write_yaml(tmp_path, demo_config(demo_models))
    compile_into(config, tmp_path / "a")
    compile_into(config, tmp_path / "b")
    first = tree(tmp_path / "a")
    assert first == tree(tmp_path / "b")


def test_compile_repository_skips_writing_when_repository_is_current(
    tmp_path: Path, demo_models: dict[str, Path], compile_into: Any
) -> None:
    config, out = write_yaml(tmp_path, demo_config(demo_models)), tmp_path / "repo"
    compile_into(config, out)
    inode = (out / "sluice.json").stat().st_ino
    said: list[str] = []
    compile_into(config, out, said.append)
    assert any("up to date" in line for line in said)
    assert (out / "sluice.json").stat().st_ino == inode  # not rewritten
    assert any("using cached" in line for line in said)  # and nothing exported again


def test_compile_repository_matches_layered_yaml_when_given_the_flat_config_py(
    tmp_path: Path, demo_models: dict[str, Path], compile_into: Any
) -> None:
    minilm, llm = demo_models["all-MiniLM-L6-v2"], demo_models["tiny-llm"]
    flat = tmp_path / "config.py"
    flat.write_text(
        f"EMBEDDING_SERVICE_CONFIG = {{'embedding_model_name': {str(minilm)!r}, 'batch_size': 32,"
        " 'worker_count': 2, 'enable_cache': False}\n"
        f"LLM_SERVICE_CONFIG = {{'llm_model_name': {str(llm)!r}, 'max_length': 256, 'batch_size': 2,"
        " 'rate_limit': 5}\n"
        "GATEWAY_CONFIG = {'port': 9090}\n",
        encoding="utf-8",
    )
    layered = write_yaml(tmp_path, {
        "models": {
            "embedding": {"type": "embedding", "model_name": str(minilm)},
            "llm": {"type": "llm", "model_name": str(llm), "max_length": 256},
        },
        "services": {
            "embedding_service": {
                "model": "embedding", "runtime": {"batch_size": 32, "worker_count": 2, "enable_cache": False}
            },
            "llm_service": {"model": "llm", "runtime": {"batch_size": 2, "rate_limit": 5}},
        },
        "gateway": {"port": 9090},
    })
    compile_into(flat, tmp_path / "flat")
    compile_into(layered, tmp_path / "layered")
    assert tree(tmp_path / "flat") == tree(tmp_path / "layered")


def test_compile_repository_removes_a_service_when_it_leaves_the_config(
    tmp_path: Path, minimal: dict[str, Any], compile_into: Any
) -> None:
    out = tmp_path / "repo"
    compile_into(write_yaml(tmp_path, config_with({"services.second": {"model": "emb"}}, minimal)), out)
    assert (out / "second" / "config.pbtxt").exists()
    compile_into(write_yaml(tmp_path, minimal), out)
    assert not (out / "second").exists()
    assert (out / "svc" / "config.pbtxt").exists()


def test_compile_repository_keeps_previous_output_when_config_is_invalid(
    tmp_path: Path, minimal: dict[str, Any], compile_into: Any
) -> None:
    out = tmp_path / "repo"
    compile_into(write_yaml(tmp_path, minimal), out)
    before = tree(out)
    broken = write_yaml(tmp_path, config_with({"services.svc.runtime.batch_size": 0}, minimal), name="broken.yaml")
    with pytest.raises(ConfigError):
        compile_into(broken, out)
    assert tree(out) == before


def test_compile_repository_keeps_previous_output_when_a_model_is_missing(
    tmp_path: Path, minimal: dict[str, Any], compile_into: Any
) -> None:
    out = tmp_path / "repo"
    compile_into(write_yaml(tmp_path, minimal), out)
    before = tree(out)
    missing = config_with({"models.emb.model_name": str(tmp_path / "no-such-model")}, minimal)
    with pytest.raises(CompileError, match="was not found locally"):
        compile_into(write_yaml(tmp_path, missing, name="missing.yaml"), out)
    assert tree(out) == before


def test_compile_repository_keeps_previous_output_when_writing_fails_midway(
    tmp_path: Path, minimal: dict[str, Any], compile_into: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "repo"
    compile_into(write_yaml(tmp_path, minimal), out)
    before = tree(out)
    real_write = write_module._write_file
    calls = []

    def failing_write(root: Path, relative: str, content: write_module.Content) -> None:
        calls.append(relative)
        if len(calls) == 5:
            raise OSError("disk full")
        real_write(root, relative, content)

    monkeypatch.setattr(write_module, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        compile_into(write_yaml(tmp_path, config_with({"services.other": {"model": "emb"}}, minimal)), out)
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_compile_repository_refuses_to_overwrite_when_directory_is_not_its_own(
    tmp_path: Path, minimal: dict[str, Any], compile_into: Any
) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(CompileError, match="not created by `sluice compile`"):
        compile_into(write_yaml(tmp_path, minimal), out)
    assert tree(out) == {"notes.txt": b"mine"}


def test_compile_repository_adopts_the_directory_when_it_holds_only_the_tracked_readme(
    tmp_path: Path, minimal: dict[str, Any], compile_into: Any
) -> None:
    out = tmp_path / "model_repository"
    out.mkdir()
    (out / "README.md").write_text("placeholder", encoding="utf-8")
    compile_into(write_yaml(tmp_path, minimal), out)
    assert (out / "svc" / "config.pbtxt").exists()


def test_tracked_readme_matches_compiled_readme_when_compiled() -> None:
    from compiler.render import README_TEXT

    tracked = Path(__file__).parent.parent / "model_repository" / "README.md"
    assert tracked.read_text(encoding="utf-8") == README_TEXT
