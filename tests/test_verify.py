"""`sluice verify` against a real stack (tritonserver and the gateway): it passes the knobs the stack keeps, and
fails, naming them, the knobs the stack was deliberately started without (a config that says one thing, a stack
compiled from another)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.settings import GatewaySettings
from sluice.cli import app
from tests.gateway_server import GatewayServer
from tests.helpers import compiled_triton, write_yaml
from tests.tiny_llm import save_tiny_llm

KNOBS = ("enable_cache", "batch_size", "queue_timeout", "max_queue_size", "rate_limit", "total_timeout")


def live_config(models: dict[str, Path], llm: Path) -> dict[str, Any]:
    """What the stack runs."""
    return {
        "models": {
            "minilm": {"type": "embedding", "model_name": str(models["all-MiniLM-L6-v2"]), "max_length": 128},
            "tiny": {"type": "llm", "model_name": str(llm), "max_length": 512, "max_tokens": 16},
        },
        "services": {
            "embedding_service": {"model": "minilm", "runtime": {
                "batch_size": 8, "batch_timeout": 0.01, "max_queue_size": 16, "worker_count": 1,
                "queue_timeout": 0.2, "inference_timeout": 0.5, "total_timeout": 0.8, "rate_limit": 60.0,
                "enable_cache": False,
            }},
            "llm_service": {"model": "tiny", "runtime": {
                "batch_size": 4, "batch_timeout": 0.02, "max_queue_size": 6, "worker_count": 1,
                "queue_timeout": 0.2, "inference_timeout": 5.0, "total_timeout": 6.0, "rate_limit": 40.0,
            }},
        },
    }


def broken(config: dict[str, Any]) -> dict[str, Any]:
    """What the config says, where the stack was started with other values: three knobs it does not keep."""
    declared = json.loads(json.dumps(config))
    declared["services"]["embedding_service"]["runtime"] |= {"enable_cache": True, "rate_limit": 30.0}
    declared["services"]["llm_service"]["runtime"]["batch_size"] = 2
    return declared


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    root = tmp_path_factory.mktemp("verify-stack")
    llm = save_tiny_llm(root / "tiny-llm", max_positions=512, can_end=False)
    config = live_config(demo_models, llm)
    with compiled_triton(root, config, export_cache) as (triton, repository):
        settings = GatewaySettings.from_repository(repository, triton_grpc=triton.grpc_url, environ={})
        with GatewayServer(settings) as gateway:
            yield config, [
                "--gateway", gateway.url, "--triton", triton.http_url, "--triton-metrics", triton.metrics_url,
            ]


def verify(tmp_path: Path, config: dict[str, Any], addresses: list[str]) -> tuple[int, str, dict[str, Any]]:
    """`sluice verify` in its own process (the gateway under test runs in this one), narrowed to KNOBS."""
    config_file = write_yaml(tmp_path, config)
    report, markdown = tmp_path / "verify.json", tmp_path / "verify.md"
    knobs = [argument for knob in KNOBS for argument in ("--knob", knob)]
    done = subprocess.run(
        [sys.executable, "-m", "sluice", "verify", str(config_file), *addresses, *knobs, "--json", str(report),
         "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=300,
    )
    found = json.loads(report.read_text())
    assert markdown.read_text().endswith(found["summary"] + "\n")
    assert markdown.read_text().count("| `rate_limit` |") == len(config["services"])
    return done.returncode, done.stdout + done.stderr, found


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {f"{check['service']}.{check['knob']}": check["verdict"] for check in report["checks"]}


@pytest.mark.integration
def test_verify_passes_the_knobs_a_stack_keeps(tmp_path: Path, stack: tuple[dict[str, Any], list[str]]) -> None:
    config, addresses = stack
    code, output, report = verify(tmp_path, config, addresses)
    found = verdicts(report)
    assert code == 0, output
    assert set(found) == {f"{service}.{knob}" for service in config["services"] for knob in KNOBS}, output
    assert "fail" not in found.values(), output
    # The probes that a small stack can always make act did act: none of these is n/a.
    for name in ("embedding_service.rate_limit", "embedding_service.queue_timeout", "llm_service.batch_size",
                 "llm_service.max_queue_size", "llm_service.rate_limit", "llm_service.queue_timeout"):
        assert found[name] == "pass", output
    assert "embedding_service" in output and "measured" in output  # the tables


@pytest.mark.integration
def test_verify_fails_naming_each_knob_the_stack_does_not_keep(
    tmp_path: Path, stack: tuple[dict[str, Any], list[str]]
) -> None:
    config, addresses = stack
    code, output, report = verify(tmp_path, broken(config), addresses)
    failed = {name for name, verdict in verdicts(report).items() if verdict == "fail"}
    assert code == 1, output
    assert failed == {"embedding_service.enable_cache", "embedding_service.rate_limit", "llm_service.batch_size"}, (
        output
    )
    assert "3 failed" in output and "embedding_service.enable_cache" in output


def test_verify_names_an_unknown_knob_or_service_and_a_missing_stack(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, {
        "models": {"m": {"type": "embedding", "model_name": str(tmp_path)}},
        "services": {"embedding_service": {"model": "m"}},
    })
    runner = CliRunner()
    unknown_knob = runner.invoke(app, ["verify", str(config), "--knob", "batch_sise"])
    assert unknown_knob.exit_code == 1 and "'batch_sise' is not a knob" in unknown_knob.output
    unknown_service = runner.invoke(app, ["verify", str(config), "--service", "nope"])
    assert unknown_service.exit_code == 1 and "no service 'nope'" in unknown_service.output
    nothing = runner.invoke(app, ["verify", str(config), "--gateway", "http://127.0.0.1:9"])
    assert nothing.exit_code == 1 and "no ready gateway at http://127.0.0.1:9" in nothing.output
