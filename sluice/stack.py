"""The running stack that `sluice verify` and `sluice bench` measure: where its gateway and Triton answer.

Either one already running (addresses from the config, or given), or one brought up here with `sluice up` and
stopped afterwards (``--up``). Its services and knobs come from the config (``build_plan``): what the stack was
told to do, to compare with what it does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compiler.pipeline import build_plan
from compiler.plan import RepositoryPlan, ServicePlan
from sluice.errors import SluiceError
from sluice.manifest import client_host
from sluice.verify.observe import http_get

UP_TIMEOUT_S = 300.0  # a first `sluice up` exports the ONNX models: minutes on 2 cores


@dataclass(frozen=True)
class Stack:
    plan: RepositoryPlan
    gateway: str  # http://host:port, no trailing slash
    triton_http: str
    triton_metrics: str  # .../metrics
    api_key: str | None = None

    def service(self, name: str) -> ServicePlan:
        for service in self.plan.services:
            if service.name == name:
                return service
        raise SluiceError(f"no service {name!r} in the config (services: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return [service.name for service in self.plan.services]

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def configured_stack(config: Path, *, gateway: str | None = None, triton: str | None = None,
                     triton_metrics: str | None = None, api_key: str | None = None) -> Stack:
    """The stack ``config`` describes, at the addresses its ``server`` and ``gateway`` sections give unless told."""
    plan = build_plan(config).plan
    server, front = plan.config.server, plan.config.gateway
    host = client_host(server.host)
    key = api_key or os.environ.get("SLUICE_API_KEY") or (front.api_keys[0] if front.api_keys else None)
    return Stack(
        plan=plan,
        gateway=(gateway or f"http://{client_host(front.host)}:{front.port}").rstrip("/"),
        triton_http=(triton or f"http://{host}:{server.http_port}").rstrip("/"),
        triton_metrics=triton_metrics or f"http://{host}:{server.metrics_port}/metrics",
        api_key=key,
    )


def ready(gateway: str) -> bool:
    """Whether the gateway at ``gateway`` answers /ready with 200."""
    try:
        http_get(f"{gateway}/ready", timeout_s=2)
    except SluiceError:
        return False
    return True


@contextmanager
def brought_up(config: Path, repository: Path, *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
               access_log: bool = False) -> Iterator[int]:
    """`sluice up CONFIG -o REPOSITORY` until the gateway's /ready answers; yields its process id (its children:
    tritonserver and `sluice gateway`); stopped (SIGINT, as Ctrl-C) on exit. ``env``: its whole environment (default:
    this one's); its log goes to a temporary file, never a pipe nobody reads, and is shown if it fails to start."""
    stack = configured_stack(config)
    if ready(stack.gateway):
        raise SluiceError(f"a gateway already answers at {stack.gateway}: stop it, or measure it without --up")
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "sluice", "up", str(config), "-o", str(repository),
         "--access-log" if access_log else "--no-access-log"],
        cwd=cwd, env=dict(env) if env is not None else None, stdout=subprocess.DEVNULL, stderr=log, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while not ready(stack.gateway):
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SluiceError(f"`sluice up {config}` did not become ready:\n{log.read()[-4000:]}")
            time.sleep(0.3)
        yield process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
