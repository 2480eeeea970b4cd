"""`sluice bench` against a real stack of the small demo models: tritonserver, the gateway, one encoder and the LLM,
with one-second steps; and its refusals of bad options."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.settings import GatewaySettings
from sluice.cli import app
from sluice.triton_server import TritonServer
from tests.gateway_server import GatewayServer
from tests.helpers import compiled_triton, write_yaml

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EMBEDDING_BATCH, LLM_BATCH = 8, 4
UNLIMITED = {"rate_limit": 10_000}  # the models' capacity, not the limiter's, is measured here


def bench_config(models: dict[str, Path]) -> dict[str, Any]:
    return {
        "models": {
            "minilm": {"type": "embedding", "model_name": str(models["all-MiniLM-L6-v2"])},
            "tiny_llm": {"type": "llm", "model_name": str(models["tiny-llm"]), "max_length": 128},
        },
        "services": {
            "embedding_service": {"model": "minilm", "runtime": {**UNLIMITED, "batch_size": EMBEDDING_BATCH,
                                                                   "worker_count": 1}},
            "llm_service": {"model": "tiny_llm", "runtime": {**UNLIMITED, "batch_size": LLM_BATCH}},
        },
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path],
          export_cache: Path) -> Iterator[tuple[TritonServer, str, Path]]:
    root = tmp_path_factory.mktemp("bench-stack")
    with compiled_triton(root, bench_config(demo_models), export_cache) as (triton, repository):
        settings = GatewaySettings.from_repository(repository, triton_grpc=triton.grpc_url, environ={})
        with GatewayServer(settings) as gateway:
            yield triton, gateway.url, root / "config.yaml"


@pytest.mark.integration
def test_bench_writes_figures_and_plots_for_an_encoder_and_the_llm(
    stack: tuple[TritonServer, str, Path], tmp_path: Path
) -> None:
    triton, gateway, config = stack
    out = tmp_path / "results"
    result = CliRunner().invoke(app, [
        "bench", str(config), "--gateway", gateway, "--triton", triton.http_url, "--triton-metrics",
        triton.metrics_url, "--out", str(out), "--seconds", "1", "--concurrency", "1,2", "--load", "0.5,1.5",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert set(report["services"]) == {"embedding_service", "llm_service"}
    for name, batch_size in (("embedding_service", EMBEDDING_BATCH), ("llm_service", LLM_BATCH)):
        service = report["services"][name]
        assert service["capacity_per_s"] > 0
        assert [s["concurrency"] for s in service["closed"]] == [1, 2]
        assert [s["load"] for s in service["open"]] == [0.5, 1.5]
        for step in service["closed"] + service["open"]:
            assert step["throughput_per_s"] > 0, step
            assert step["goodput_per_s"] <= step["throughput_per_s"], step
            latency = step["latency_ms"]
            assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"], step
        histogram = {int(size): count for size, count in service["batches"]["histogram"].items()}
        assert histogram and all(count > 0 for count in histogram.values()), service["batches"]
        assert max(histogram) <= batch_size, service["batches"]
        plots = ["throughput", "latency", "batches"] + (["ttft"] if name == "llm_service" else [])
        for plot in plots:
            png = (out / f"{name}-{plot}.png").read_bytes()
            assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000, plot
    llm = report["services"]["llm_service"]
    for step in llm["closed"] + llm["open"]:
        assert 0 < step["ttft_ms"]["p50"] <= step["ttft_ms"]["p99"] <= step["latency_ms"]["p99"], step
        assert step["tokens_per_s"] > 0, step
    assert not (out / "embedding_service-ttft.png").exists()
    assert "embedding_service (capacity" in result.output


@pytest.mark.parametrize(("option", "value"), [("--concurrency", "0,4"), ("--concurrency", "many"),
                                               ("--load", "-1"), ("--load", "")])
def test_bench_refuses_when_a_sweep_option_is_malformed(option: str, value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "absent.yaml"), option, value])
    assert result.exit_code == 1
    assert option in result.output and repr(value) in result.output


def test_bench_names_the_services_when_one_is_unknown(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, {"models": {"m": {"type": "embedding", "model_name": "some/model"}},
                                   "services": {"svc": {"model": "m"}}})
    result = CliRunner().invoke(app, ["bench", str(config), "--service", "nope"])
    assert result.exit_code == 1
    assert "no service 'nope'" in result.output and "svc" in result.output
