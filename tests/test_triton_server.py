"""Tests for sluice.triton_server: the command line and environment, and the real tritonserver (integration)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compiler.schema import Server
from sluice.errors import SluiceError
from sluice.triton_server import (
    TritonServer,
    TritonSettings,
    find_tritonserver,
    free_ports,
    prepare_backend_dir,
    triton_command,
    triton_env,
)

ECHO_REPOSITORY = Path(__file__).parent / "fixtures" / "triton_echo"

BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights file missing: /nowhere/xyzzy.onnx")

    def execute(self, requests):
        return []
"""


def _settings(tmp_path: Path, exit_timeout_secs: int = 5) -> TritonSettings:
    # A copy of the fixture repository: the stub writes __pycache__ next to model.py, and tests add models.
    repository = tmp_path / "repository"
    shutil.copytree(ECHO_REPOSITORY, repository)
    http_port, grpc_port, metrics_port = free_ports(3)
    server = Server(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    return TritonSettings(repository, tmp_path / "work", server, exit_timeout_secs)


def _group_alive(pgid: int) -> list[int]:
    """Non-zombie processes of group ``pgid``, read from /proc (no psutil)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def _stub_pids(pgid: int) -> list[int]:
    stubs = []
    for pid in _group_alive(pgid):
        try:
            if b"triton_python_backend_stub" in Path("/proc", str(pid), "cmdline").read_bytes():
                stubs.append(pid)
        except OSError:
            continue
    return stubs


def test_triton_command_binds_loopback_when_host_left_default(tmp_path: Path) -> None:
    settings = TritonSettings(model_repository=tmp_path, workdir=tmp_path)
    command = triton_command(settings, find_tritonserver(), tmp_path / "backends")

    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in command
    assert "--exit-on-error=false" in command
    assert f"--cache-config=local,size={256 * 1024 * 1024}" in command


def test_triton_command_leaves_cache_out_when_cache_size_is_zero(tmp_path: Path) -> None:
    settings = TritonSettings(tmp_path, tmp_path, Server(response_cache_bytes=0))
    command = triton_command(settings, find_tritonserver(), tmp_path / "backends")

    assert not [arg for arg in command if arg.startswith("--cache")]


def test_find_tritonserver_picks_stub_of_running_python_when_wheel_installed() -> None:
    install = find_tritonserver()

    assert install.binary.is_file()
    assert install.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (install.caches_dir / "local" / "libtritoncache_local.so").is_file()


def test_prepare_backend_dir_copies_once_when_called_twice(tmp_path: Path) -> None:
    install = find_tritonserver()
    backends = prepare_backend_dir(install, tmp_path)
    stub = backends / "python" / "triton_python_backend_stub"
    first = stub.stat()

    assert prepare_backend_dir(install, tmp_path) == backends
    assert (backends / "python" / "libtriton_python.so").is_file()
    assert os.access(stub, os.X_OK)
    assert stub.stat().st_ino == first.st_ino  # not copied again


def test_triton_env_puts_this_python_first_when_built() -> None:
    env = triton_env(find_tritonserver())

    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0].endswith("nvidia_pytriton.libs")


def test_triton_server_urls_name_loopback_when_bound_to_all_addresses(tmp_path: Path) -> None:
    server = TritonServer(TritonSettings(tmp_path, tmp_path, Server(host="0.0.0.0")))

    assert server.http_url == "http://127.0.0.1:8000"
    assert server.grpc_url == "127.0.0.1:8001"
    assert server.metrics_url == "http://127.0.0.1:8002/metrics"


def test_triton_server_urls_bracket_the_address_when_bound_to_ipv6_loopback(tmp_path: Path) -> None:
    server = TritonServer(TritonSettings(tmp_path, tmp_path, Server(host="::1")))

    assert server.http_url == "http://[::1]:8000"
    assert server.grpc_url == "[::1]:8001"


@pytest.mark.integration
def test_triton_server_echoes_input_when_ready(tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    with TritonServer(_settings(tmp_path), startup_timeout=60) as server:
        client = httpclient.InferenceServerClient(server.http_address)
        assert client.is_model_ready("echo")
        infer_input = httpclient.InferInput("INPUT", [2, 1], "BYTES")
        infer_input.set_data_from_numpy(np.array([[b"hello"], [b"sluice"]], dtype=np.object_))

        result = client.infer("echo", [infer_input])

        assert result.as_numpy("OUTPUT").tolist() == [[b"hello"], [b"sluice"]]
        client.close()


@pytest.mark.integration
def test_triton_server_stop_leaves_no_process_when_stubs_were_running(tmp_path: Path) -> None:
    server = TritonServer(_settings(tmp_path))
    server.start()
    try:
        server.wait_until_ready(60)
        pgid = server.pid
        assert pgid is not None
        stubs = _stub_pids(pgid)
        assert stubs, "expected the echo model's stub process in the server's group"
    finally:
        server.stop()

    assert _group_alive(pgid) == []
    with pytest.raises(ProcessLookupError):  # not even a zombie is left in the group
        os.killpg(pgid, 0)


@pytest.mark.integration
def test_triton_server_stop_kills_group_and_frees_shm_when_grace_is_zero(tmp_path: Path) -> None:
    server = TritonServer(_settings(tmp_path))
    server.start()
    server.wait_until_ready(60)
    pgid = server.pid
    assert pgid is not None
    # The stub's command line names its shared-memory region: [stub, model.py, region, ...].
    regions = [Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0")[2].decode() for pid in _stub_pids(pgid)]
    assert regions and all(Path("/dev/shm", region).exists() for region in regions)

    server.stop(grace=0)

    assert _group_alive(pgid) == []
    assert not [region for region in regions if Path("/dev/shm", region).exists()]


@pytest.mark.integration
def test_triton_server_stop_returns_within_exit_timeout_when_keepalive_connection_idles(tmp_path: Path) -> None:
    # Triton's shutdown waits for every open HTTP connection, idle keep-alive ones included, up to its exit
    # timeout (30 s by default); --exit-timeout-secs bounds it.
    server = TritonServer(_settings(tmp_path, exit_timeout_secs=1))
    server.start()
    server.wait_until_ready(60)
    idle = http.client.HTTPConnection("127.0.0.1", server.settings.server.http_port)
    idle.request("GET", "/v2/health/live")
    idle.getresponse().read()

    started = time.monotonic()
    server.stop(grace=20)

    assert time.monotonic() - started < 8
    idle.close()


@pytest.mark.integration
def test_wait_until_ready_quotes_model_error_when_initialize_raises(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    broken = settings.model_repository / "broken"
    shutil.copytree(settings.model_repository / "echo", broken)
    config = (broken / "config.pbtxt").read_text().replace('name: "echo"', 'name: "broken"')
    (broken / "config.pbtxt").write_text(config)
    (broken / "1" / "model.py").write_text(BROKEN_MODEL)

    with pytest.raises(SluiceError) as raised:
        with TritonServer(settings, startup_timeout=60):
            pass

    message = str(raised.value)
    assert "broken: " in message
    assert "RuntimeError: weights file missing: /nowhere/xyzzy.onnx" in message
    assert "echo" not in message.split("(full log")[0]  # the healthy model is not blamed


@pytest.mark.integration
def test_wait_until_ready_quotes_log_when_config_cannot_be_parsed(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    config = settings.model_repository / "echo" / "config.pbtxt"
    config.write_text(config.read_text().replace("TYPE_STRING", "TYPE_NOPE", 1))

    with pytest.raises(SluiceError, match=r"echo: .*failed to read text proto"):
        with TritonServer(settings, startup_timeout=60):
            pass


@pytest.mark.integration
def test_wait_until_ready_quotes_exit_reason_when_port_is_taken(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.server.http_port))
        squatter.listen()

        with pytest.raises(SluiceError, match=r"(?s)exited with code 1.*already in use"):
            with TritonServer(settings, startup_timeout=60):
                pass


def test_triton_server_stop_is_a_no_op_when_never_started(tmp_path: Path) -> None:
    TritonServer(TritonSettings(model_repository=tmp_path, workdir=tmp_path)).stop()
