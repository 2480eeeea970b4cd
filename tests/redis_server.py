"""Start and stop a real, throwaway ``redis-server`` for tests (no mocks, no fakeredis).

The server listens on a free loopback port, keeps nothing on disk (``--save '' --appendonly no``) and runs in its
own temporary directory, so parallel test sessions never share state.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it; another process could take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_command(port: int, workdir: str) -> list[str]:
    """The exact command line, kept in one place so the report and the tests agree."""
    return [
        REDIS_SERVER or "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", workdir,
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip


@contextlib.contextmanager
def running_redis(startup_timeout_s: float = 10.0) -> Iterator[str]:
    """Run a ``redis-server`` for the duration of the block and yield its URL (``redis://127.0.0.1:PORT/0``)."""
    if REDIS_SERVER is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    with tempfile.TemporaryDirectory(prefix="sluice-redis-") as workdir, open(f"{workdir}/redis.log", "wb") as log:
        port = free_port()
        process = subprocess.Popen(redis_server_command(port, workdir), stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_ready(process, port, startup_timeout_s, log.name)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(process: subprocess.Popen[bytes], port: int, timeout_s: float, log_path: str) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                with open(log_path, encoding="utf-8", errors="replace") as log:
                    raise RuntimeError(f"redis-server exited with {process.returncode}: {log.read()[-2000:]}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {port} not ready after {timeout_s} s")
    finally:
        client.close()


class RestartableRedis:
    """A real redis-server on a fixed port, to kill (SIGKILL) and start again on that port (fault tests and
    python -m benchmarks.faults redis)."""

    def __init__(self, port: int, workdir: str) -> None:
        self.port, self.workdir = port, workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(redis_server_command(self.port, self.workdir),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=5)
