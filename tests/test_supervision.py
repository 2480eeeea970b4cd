"""`sluice up` as a user runs it, with its processes killed under it: what a client sees, and that it comes back."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.overload import child_pid
from sluice.supervise import Backoff
from sluice.triton_server import free_ports
from tests.helpers import write_yaml
from tests.test_serve_cli import descendants_alive

pytestmark = pytest.mark.integration

# Triton's load of MiniLM on 2 busy cores, the first restart's backoff and the gRPC reconnect, with room to spare.
BACK_WITHIN_S = 60
_texts = (f"supervision text {i}" for i in itertools.count())


class Up:
    def __init__(self, process: subprocess.Popen[bytes], gateway: str, log: Path, marker: str) -> None:
        self.process, self.gateway, self.log, self.marker = process, gateway, log, marker
        self.last_answer = ""  # the last answer answers() saw, shown when a wait fails

    def child(self, mentioning: str) -> int:
        """The pid of `sluice up`'s live child whose command line mentions ``mentioning``."""
        return child_pid(self.process.pid, mentioning)

    def embed(self) -> httpx.Response:
        return httpx.post(f"{self.gateway}/v1/embeddings", json={"model": "embed", "input": next(_texts)}, timeout=10)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float,
               last_answer: Callable[[], str] = lambda: "") -> float:
    """Seconds until ``condition`` held; fails naming ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s} s: {what} (last answer: {last_answer()})")
        time.sleep(0.05)
    return time.monotonic() - started


def answers(up: Up, status: int) -> bool:
    try:
        response = up.embed()
    except httpx.TransportError as error:
        up.last_answer = repr(error)
        return False
    up.last_answer = f"{response.status_code} {response.text}"
    return response.status_code == status


@contextlib.contextmanager
def sluice_up(tmp_path: Path, demo_models: dict[str, Path], export_cache: Path, *args: str) -> Iterator[Up]:
    """`sluice up` (with ``args``) on the MiniLM embedding service alone, until it serves; SIGINT at the end."""
    http_port, grpc_port, metrics_port, gateway_port = free_ports(4)
    config = write_yaml(tmp_path, {
        "models": {"minilm": {"type": "embedding", "model_name": str(demo_models["all-MiniLM-L6-v2"])}},
        "services": {"embed": {"model": "minilm", "runtime": {
            # total_timeout well above the first call after a restart (slow on 2 busy cores): one such call sets the
            # gateway's cost estimate, and an estimate above total_timeout refuses every request until a call is
            # measured again, which then never happens (gateway/scheduler.py, left as found).
            "worker_count": 1, "enable_cache": False, "total_timeout": 5.0}}},
        "server": {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port},
        "gateway": {"port": gateway_port},
    })
    log = tmp_path / "up.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "sluice", "up", str(config), "-o", str(tmp_path / "repo"), "--no-access-log", *args],
            cwd=tmp_path, env={**os.environ, "SLUICE_CACHE_DIR": str(export_cache), "COLUMNS": "200"},
            stdout=output, stderr=subprocess.STDOUT,
        )
    started = Up(process, f"http://127.0.0.1:{gateway_port}", log, str(tmp_path))
    try:
        # Its endpoints are printed once it saw the gateway up, and supervises from then on.
        wait_until(lambda: process.poll() is not None or "Ctrl-C stops everything" in log.read_text(),
                   "sluice up prints its endpoints", 240)
        assert process.poll() is None, log.read_text()
        wait_until(lambda: answers(started, 200), "sluice up serves", 30)
        assert process.poll() is None, log.read_text()
        yield started
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print(log.read_text())  # shown when a test fails


@pytest.fixture
def up(tmp_path: Path, demo_models: dict[str, Path], export_cache: Path) -> Iterator[Up]:
    with sluice_up(tmp_path, demo_models, export_cache) as started:
        yield started


def test_killed_triton_gets_503_with_retry_after_then_is_restarted_and_serves_again(up: Up) -> None:
    os.kill(up.child("tritonserver"), signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not answers(up, 200), "a request after the kill is refused", 5)
    refused = up.embed()
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert time.monotonic() - killed < 5
    ready = httpx.get(f"{up.gateway}/ready", timeout=10)
    assert ready.status_code == 503
    assert "not ready: embed" in ready.text
    wait_until(lambda: answers(up, 200), "a 200 after Triton's restart", BACK_WITHIN_S, lambda: up.last_answer)
    assert httpx.get(f"{up.gateway}/ready", timeout=10).status_code == 200
    log = up.log.read_text()
    assert "tritonserver was killed by SIGKILL" in log, log
    assert "last lines of its log:" in log and "tritonserver restarted" in log, log


def test_killed_gateway_is_restarted_on_its_port(up: Up) -> None:
    first = up.child("sluice gateway")
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: answers(up, 200), "a 200 from the restarted gateway", BACK_WITHIN_S, lambda: up.last_answer)
    assert up.child("sluice gateway") != first
    log = up.log.read_text()
    assert "gateway was killed by SIGKILL" in log and "gateway restarted" in log, log


def test_ctrl_c_after_restarts_leaves_no_process_behind(up: Up) -> None:
    os.kill(up.child("tritonserver"), signal.SIGKILL)
    os.kill(up.child("sluice gateway"), signal.SIGKILL)
    wait_until(lambda: answers(up, 200), "a 200 after both restarts", BACK_WITHIN_S, lambda: up.last_answer)
    up.process.send_signal(signal.SIGINT)
    assert up.process.wait(timeout=60) == 0
    wait_until(lambda: descendants_alive(up.marker) == [], "every process of sluice up has ended", 10)


def test_backoff_doubles_to_its_maximum_and_starts_over_after_a_long_run() -> None:
    backoff = Backoff(initial=0.5, maximum=10, reset_after=30)
    assert [backoff.delay(uptime=1) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.delay(uptime=31) == 0.5


def test_serve_restarts_a_killed_triton_on_the_same_port(tmp_path: Path, demo_models: dict[str, Path],
                                                         export_cache: Path) -> None:
    http_port, grpc_port, metrics_port = free_ports(3)
    config = write_yaml(tmp_path, {
        "models": {"minilm": {"type": "embedding", "model_name": str(demo_models["all-MiniLM-L6-v2"])}},
        "services": {"embed": {"model": "minilm"}},
        "server": {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port},
    })
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "sluice", "serve", str(config), "-o", str(tmp_path / "repo")],
            cwd=tmp_path, env={**os.environ, "SLUICE_CACHE_DIR": str(export_cache), "COLUMNS": "200"},
            stdout=output, stderr=subprocess.STDOUT,
        )
    serve = Up(process, "", log, str(tmp_path))
    ready = f"http://127.0.0.1:{http_port}/v2/models/embed/ready"

    def model_ready() -> bool:
        try:
            return httpx.get(ready, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(lambda: process.poll() is not None or "ready; Ctrl-C" in log.read_text(), "serve is ready", 240)
        assert process.poll() is None, log.read_text()
        os.kill(serve.child("tritonserver"), signal.SIGKILL)
        wait_until(lambda: not model_ready(), "Triton is down", 5)
        wait_until(model_ready, "Triton serves again on its port", BACK_WITHIN_S)
        assert "tritonserver was killed by SIGKILL" in log.read_text()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()
    wait_until(lambda: descendants_alive(str(tmp_path)) == [], "every process of sluice serve has ended", 10)


def tritonservers(up: Up) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _child_runs(e, up.process.pid)]


def _child_runs(entry: Path, parent: int) -> bool:
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]) == parent and fields[0] != "Z" and "tritonserver" in (entry / "cmdline").read_text()
    except (OSError, IndexError, UnicodeDecodeError):
        return False


def test_up_with_two_triton_replicas_serves_through_a_kill_of_one(
    tmp_path: Path, demo_models: dict[str, Path], export_cache: Path
) -> None:
    with sluice_up(tmp_path, demo_models, export_cache, "--triton-replicas", "2") as up:
        first, second = tritonservers(up)
        os.kill(second, signal.SIGKILL)
        # One client, so at most one request was on the killed replica: retried once on the other, never an error.
        statuses = [up.embed().status_code for _ in range(30)]
        assert statuses == [200] * 30, statuses
        wait_until(lambda: len(tritonservers(up)) == 2 and "tritonserver restarted" in up.log.read_text(),
                   "the killed replica is restarted", BACK_WITHIN_S)
        assert first in tritonservers(up)
        assert "tritonserver was killed by SIGKILL" in up.log.read_text()
