"""`sluice serve` as a user runs it: a subprocess that serves until SIGTERM and leaves nothing behind."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from compiler.pipeline import build_plan
from sluice.serve import exit_timeout_for
from sluice.triton_server import free_ports
from tests.helpers import write_yaml

DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.integration


def serve_config(tmp_path: Path, llm_dir: Path) -> Path:
    http_port, grpc_port, metrics_port = free_ports(3)
    return write_yaml(tmp_path, {
        "models": {"llm": {"type": "llm", "model_name": str(llm_dir), "max_length": 128}},
        "services": {"chat": {"model": "llm"}},
        "server": {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port},
    })


def run_serve(config: Path, export_cache: Path, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sluice", "serve", str(config), "-o", str(config.parent / "repo"), *options],
        cwd=config.parent,
        env={**os.environ, "SLUICE_CACHE_DIR": str(export_cache), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def descendants_alive(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a path unique to this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(cmdline)
    return found


def test_serve_serves_until_signalled_and_leaves_no_process_when_signalled_twice(
    tmp_path: Path, demo_models: dict[str, Path], export_cache: Path
) -> None:
    config = serve_config(tmp_path, demo_models["tiny-llm"])
    process = run_serve(config, export_cache)
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if "ready; Ctrl-C stops everything" in line:
            break
    else:
        pytest.fail("serve ended before it was ready:\n" + "".join(lines))
    url = next(line.split()[1] for line in lines if line.startswith("chat "))
    with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
        assert response.status == 200
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)  # an impatient second signal must not cut the shutdown short
    assert process.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while descendants_alive(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert descendants_alive(str(tmp_path)) == []


def test_serve_fails_with_tritons_reason_when_a_model_cannot_load(
    tmp_path: Path, demo_models: dict[str, Path], export_cache: Path
) -> None:
    broken = tmp_path / "broken-llm"
    shutil.copytree(demo_models["tiny-llm"], broken)
    (broken / "model.safetensors").write_bytes(b"these are not weights")
    process = run_serve(serve_config(tmp_path, broken), export_cache)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 1, output
    assert "- chat: Internal: SafetensorError" in output, output
    assert descendants_alive(str(tmp_path)) == []




def test_serve_uses_a_running_triton_when_given_its_url(
    tmp_path: Path, demo_models: dict[str, Path], export_cache: Path
) -> None:
    from compiler.pipeline import compile_repository
    from compiler.schema import Server
    from sluice.triton_server import TritonServer, TritonSettings

    config = serve_config(tmp_path, demo_models["tiny-llm"])
    repository = tmp_path / "repo"
    compile_repository(config, repository, cache_root=export_cache)
    http_port, grpc_port, metrics_port = free_ports(3)
    settings = TritonSettings(repository, tmp_path / "work",
                              Server(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port))
    with TritonServer(settings) as server:
        process = run_serve(config, export_cache, "--triton-url", server.http_url)
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "ready;" in line:
                break
        assert any(line.startswith(f"chat                 {server.http_url}") for line in lines), lines
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert server.is_running()  # not ours to stop


def test_serve_names_missing_services_when_the_running_triton_lacks_them(
    tmp_path: Path, demo_models: dict[str, Path], export_cache: Path
) -> None:
    config = serve_config(tmp_path, demo_models["tiny-llm"])
    (port,) = free_ports(1)
    process = run_serve(config, export_cache, "--triton-url", f"http://127.0.0.1:{port}")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "is not ready to serve: chat" in output


def test_exit_timeout_covers_every_llm_request_when_queue_and_inference_timeouts_are_long(tmp_path: Path) -> None:
    # Triton unloads a model only once its streams have ended: the exit timeout must outlast the longest request.
    seed = build_plan(DATA / "seed_config.yaml")
    [llm] = [service.runtime for service in seed.plan.services if service.model.type == "llm"]
    assert exit_timeout_for(seed) >= llm.queue_timeout + llm.inference_timeout
    text = (DATA / "seed_config.yaml").read_text()
    text = text.replace("inference_timeout: 2.0", "inference_timeout: 9.5")
    text = text.replace("total_timeout: 3.0", "total_timeout: 12")
    assert "inference_timeout: 9.5" in text and "total_timeout: 12" in text
    (tmp_path / "long.yaml").write_text(text)
    assert exit_timeout_for(build_plan(tmp_path / "long.yaml")) == math.ceil(llm.queue_timeout + 9.5) + 1
