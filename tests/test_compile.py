"""Writing the repository: the two config forms agree, output is deterministic, and writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler import write as write_module
from compiler.pipeline import compile_repository
from sluice.errors import CompileError, ConfigError
from tests.helpers import MINIMAL, config_with, tree, write_yaml

DATA = Path(__file__).parent / "data"


def test_compile_repository_gives_identical_bytes_when_run_twice(tmp_path: Path) -> None:
    compile_repository(DATA / "seed_config.yaml", tmp_path / "a")
    compile_repository(DATA / "seed_config.yaml", tmp_path / "b")
    first = tree(tmp_path / "a")
    assert first == tree(tmp_path / "b")
    compile_repository(DATA / "seed_config.yaml", tmp_path / "a")  # over its own output
    assert tree(tmp_path / "a") == first
    assert {"embedding_service/config.pbtxt", "sluice.json", ".sluice-repository"} <= first.keys()


def test_compile_repository_matches_layered_yaml_when_given_the_flat_config_py(tmp_path: Path) -> None:
    compile_repository(DATA / "seed_config.py", tmp_path / "flat")
    compile_repository(DATA / "seed_flat_equivalent.yaml", tmp_path / "layered")
    assert tree(tmp_path / "flat") == tree(tmp_path / "layered")


def test_compile_repository_removes_a_service_when_it_leaves_the_config(tmp_path: Path) -> None:
    two = config_with({"services.second": {"model": "emb"}})
    out = tmp_path / "repo"
    compile_repository(write_yaml(tmp_path, two), out)
    assert (out / "second" / "config.pbtxt").exists()
    compile_repository(write_yaml(tmp_path, MINIMAL), out)
    assert not (out / "second").exists()
    assert (out / "svc" / "config.pbtxt").exists()


def test_compile_repository_keeps_previous_output_when_config_is_invalid(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    compile_repository(write_yaml(tmp_path, MINIMAL), out)
    before = tree(out)
    broken = write_yaml(tmp_path, config_with({"services.svc.runtime.batch_size": 0}), name="broken.yaml")
    with pytest.raises(ConfigError):
        compile_repository(broken, out)
    assert tree(out) == before


def test_compile_repository_keeps_previous_output_when_writing_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "repo"
    compile_repository(write_yaml(tmp_path, MINIMAL), out)
    before = tree(out)
    real_write = write_module._write_file
    calls = []

    def failing_write(root: Path, relative: str, content: write_module.Content) -> None:
        calls.append(relative)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(root, relative, content)

    monkeypatch.setattr(write_module, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        compile_repository(write_yaml(tmp_path, config_with({"services.other": {"model": "emb"}})), out)
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_compile_repository_refuses_to_overwrite_when_directory_is_not_its_own(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(CompileError, match="not created by `sluice compile`"):
        compile_repository(write_yaml(tmp_path, MINIMAL), out)
    assert tree(out) == {"notes.txt": b"mine"}


def test_compile_repository_adopts_the_directory_when_it_holds_only_the_tracked_readme(tmp_path: Path) -> None:
    out = tmp_path / "model_repository"
    out.mkdir()
    (out / "README.md").write_text("placeholder", encoding="utf-8")
    compile_repository(write_yaml(tmp_path, MINIMAL), out)
    assert (out / "svc" / "config.pbtxt").exists()


def test_tracked_readme_matches_compiled_readme_when_compiled() -> None:
    from compiler.render import README_TEXT

    tracked = Path(__file__).parent.parent / "model_repository" / "README.md"
    assert tracked.read_text(encoding="utf-8") == README_TEXT
