"""The `sluice` command line: exit statuses, messages, and that a failed compile writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from compiler.pipeline import build_plan
from compiler.plan import enforcement
from sluice.cli import app
from tests.helpers import MINIMAL, config_with, demo_config, write_yaml

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def test_compile_exits_nonzero_and_writes_nothing_when_config_is_invalid(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, config_with({"services.svc.runtime.batch_size": -1}))
    out = tmp_path / "repo"
    result = runner.invoke(app, ["compile", str(config), "-o", str(out)])
    assert result.exit_code == 1
    assert "services.svc.runtime.batch_size" in result.output and "found -1" in result.output
    assert not out.exists()


def test_compile_prints_warnings_and_succeeds_when_strategy_is_doubtful(
    tmp_path: Path, demo_models: dict[str, Path], export_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(export_cache))
    out = tmp_path / "repo"
    config = write_yaml(tmp_path, demo_config(demo_models))
    result = runner.invoke(app, ["compile", str(config), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "can never bind" in result.output
    assert (out / "llm_service" / "config.pbtxt").exists()


def test_explain_shows_each_knob_and_where_it_is_enforced_when_config_is_valid() -> None:
    result = runner.invoke(app, ["explain", str(DATA / "seed_config.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for words in (
        "embedding_service",
        "0.01s",
        "Exceeds maximum queue size",
        "only when the engine is idle",
        "instance_group.count of KIND_CPU",
        "10/s",
        "the runtime stops a batch that has computed this long",
        "the engine ends it with finish_reason timeout",
        "the gateway's per-item cache",
        "can never bind",
    ):
        assert words in result.output


def test_explain_marks_defaults_when_a_service_sets_only_some_knobs(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, config_with({"services.svc.runtime": {"batch_size": 8}}))
    result = runner.invoke(app, ["explain", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    batch_line = next(line for line in result.output.splitlines() if "batch_size" in line)
    assert "8" in batch_line and "default" not in batch_line
    worker_line = next(line for line in result.output.splitlines() if "worker_count" in line)
    assert "(default)" in worker_line


def test_explain_exits_nonzero_when_file_is_missing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["explain", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "no such file" in result.output


def test_minimal_config_is_valid_when_written(tmp_path: Path) -> None:
    result = runner.invoke(app, ["explain", str(write_yaml(tmp_path, MINIMAL))])
    assert result.exit_code == 0, result.output


def test_explain_prints_every_row_whole_on_one_line_when_output_is_not_a_terminal() -> None:
    # 80 columns, the width a pipe gets: a table cut or wrapped rows to fit it.
    result = runner.invoke(app, ["explain", str(DATA / "seed_config.yaml")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for service in build_plan(DATA / "seed_config.yaml").plan.services:
        assert any(line.startswith(f"{service.name}  (") for line in lines)
        for row in enforcement(service):
            assert any(line.split()[:1] == [row.knob] and line.endswith(row.what) for line in lines), row.what
    assert not any(char in result.stdout for char in "│┃…")


def test_explain_json_lists_each_service_with_its_knobs_when_asked() -> None:
    result = runner.invoke(app, ["explain", "--json", str(DATA / "seed_config.yaml")])
    assert result.exit_code == 0, result.output
    services = json.loads(result.stdout)  # stdout is JSON alone: the warnings went to stderr
    compiled = build_plan(DATA / "seed_config.yaml")
    assert [service["service"] for service in services] == [service.name for service in compiled.plan.services]
    for entry, service in zip(services, compiled.plan.services, strict=True):
        assert entry["type"] == service.model.type and entry["model_name"] == service.model.model_name
        assert entry["knobs"] == {
            row.knob: {"value": row.value, "explicit": row.explicit, "where": row.where, "what": row.what}
            for row in enforcement(service)
        }
    llm = next(entry for entry in services if entry["service"] == "llm_service")
    assert llm["knobs"]["batch_size"]["value"] == 4 and llm["knobs"]["enable_cache"]["where"] == "none"
    assert "can never bind" in result.stderr


def test_help_lists_every_command_with_its_summary_when_run_without_a_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    listed = " ".join(result.stdout.replace("│", " ").split())
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert set(commands) >= {"compile", "explain", "models", "pull", "serve", "gateway", "up"}
    for name, command in commands.items():
        summary = (command.help or "").split("\n\n")[0].strip()
        assert summary, f"{name} has no help"
        assert f"{name} {summary}" in listed, name
        own = runner.invoke(app, [name, "--help"])
        assert own.exit_code == 0 and summary in " ".join(own.stdout.replace("│", " ").split()), name
