"""`sluice serve`: compile when stale, run tritonserver on the repository, wait, stop cleanly on a signal."""

from __future__ import annotations

import gc
import math
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from compiler.check import is_loopback
from compiler.pipeline import Compiled, compile_repository
from gateway.settings import GatewaySettings
from sluice.errors import SluiceError
from sluice.triton_server import TritonServer, TritonSettings, free_ports

Say = Callable[[str], None]


@dataclass(frozen=True)
class Serving:
    """A compiled config being served: Triton's URLs and a way to tell it is still up."""

    compiled: Compiled
    http_url: str
    grpc_url: str | None  # None when the Triton is not ours (its gRPC address is not known)
    alive: Callable[[], bool]
    server: TritonServer | None = None  # ours to supervise; None when the Triton is not ours
    # Further tritonservers of ours on the same repository (`sluice up --triton-replicas`), each on its own ports.
    replicas: tuple[TritonServer, ...] = ()

    @property
    def servers(self) -> tuple[TritonServer, ...]:
        return ((self.server,) if self.server is not None else ()) + self.replicas

    @property
    def grpc_target(self) -> str | None:
        """The gateway's Triton target: every server's gRPC address, comma-separated (gateway/triton_target.py)."""
        if not self.servers:
            return self.grpc_url
        return ",".join(server.grpc_url for server in self.servers)


def triton_settings(compiled: Compiled, repository: Path, workdir: Path) -> TritonSettings:
    return TritonSettings(
        repository.resolve(), workdir.resolve(), compiled.plan.config.server, exit_timeout_for(compiled)
    )


def exit_timeout_for(compiled: Compiled) -> int:
    """Triton's exit timeout: long enough for every request in flight at a stop to end by itself. Triton unloads
    a model (its finalize answers what is left) only once no stream is open, and an LLM request ends within
    queue_timeout + inference_timeout (its engine enforces both); past the exit timeout Triton gives up unclean."""
    default = TritonSettings.exit_timeout_secs
    llms = [service.runtime for service in compiled.plan.services if service.model.type == "llm"]
    return max([default, *(math.ceil(r.queue_timeout + r.inference_timeout) + 1 for r in llms)])


@contextmanager
def running_triton(
    config: Path,
    repository: Path,
    *,
    say: Say,
    triton_url: str | None = None,
    cache_root: Path | None = None,
    ready_timeout: float = 300,
    replicas: int = 1,
) -> Iterator[Serving]:
    """Compile ``config`` into ``repository`` and yield while Triton serves it.

    With ``triton_url`` no server is started: that Triton (e.g. the container of docker-compose.yml, mounting
    the same repository) must already be up with every service ready. ``replicas`` > 1 starts that many
    tritonservers on the repository: the first on the config's ports, the others on free loopback ports.
    """
    compiled = compile_repository(config, repository, cache_root=cache_root, progress=say)
    for warning in compiled.warnings:
        say(f"warning {warning}")
    if triton_url:
        url = triton_url.rstrip("/")
        check_remote_ready(url, [service.name for service in compiled.plan.services])
        yield Serving(compiled, url, grpc_url=None, alive=lambda: _ok(f"{url}/v2/health/live"))
        return
    workdir = Path(config).resolve().parent / ".sluice" / "triton"
    workdir.mkdir(parents=True, exist_ok=True)
    say("starting tritonserver (the models load in a few seconds) ...")
    settings = triton_settings(compiled, repository, workdir)
    with ExitStack() as stack:
        servers = [stack.enter_context(TritonServer(settings, startup_timeout=ready_timeout))]
        for index in range(2, replicas + 1):
            http_port, grpc_port, metrics_port = free_ports(3)
            ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
            extra = replace(
                settings, server=settings.server.model_copy(update=ports), workdir=workdir.with_name(f"triton-{index}")
            )
            extra.workdir.mkdir(parents=True, exist_ok=True)
            servers.append(stack.enter_context(TritonServer(extra, startup_timeout=ready_timeout)))
        for server in servers:
            say(f"triton  http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}")
            say(f"        log  {server.log_path}")
        first = servers[0]
        yield Serving(compiled, first.http_url, first.grpc_url, first.is_running, first, tuple(servers[1:]))


def check_remote_ready(url: str, services: list[str]) -> None:
    """Raise naming the services that an already-running Triton does not have ready."""
    missing = [name for name in services if not _ok(f"{url.rstrip('/')}/v2/models/{name}/ready")]
    if missing:
        raise SluiceError(f"Triton at {url} is not ready to serve: {', '.join(missing)}")


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http(s) URL from the user
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into KeyboardInterrupt and ignore the rest, so Ctrl-C and `kill` take the
    same orderly way out, and a second signal (an impatient Ctrl-C, or `timeout` relaying its own) cannot cut the
    shutdown short and leave Triton running."""
    signals = (signal.SIGINT, signal.SIGTERM)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        for each in signals:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {each: signal.signal(each, interrupt) for each in signals}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


def wait_forever(alive: Callable[[], bool], what: str) -> NoReturn:
    """Block until interrupted; raise if the watched process dies on its own."""
    while alive():
        time.sleep(0.5)
    raise SluiceError(f"{what} exited unexpectedly")


# Young collections every this many net allocations instead of CPython's 700; see quiet_garbage_collector.
GATEWAY_GC_THRESHOLD = 10_000


def quiet_garbage_collector() -> None:
    """Keep the collector off the gateway's request path.

    Start-up leaves about 80,000 tracked objects (modules, pydantic schemas, gRPC) that every full collection
    walks: in the benchmark such a collection paused the gateway for 65-120 ms, longer than a whole batch in
    Triton. Frozen, they are left out of every collection (full collections then took under 5 ms); a higher
    young-generation threshold makes collections rare, since a request's objects are freed by reference
    counting, not by the collector.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GATEWAY_GC_THRESHOLD, *gc.get_threshold()[1:])


def run_gateway(settings: GatewaySettings, say: Say) -> None:
    """Serve the gateway until SIGINT/SIGTERM (uvicorn's own handlers: it drains, closes, then re-raises)."""
    from gateway.app import create_app

    if not settings.key_digests:
        if not is_loopback(settings.host):
            raise SluiceError(f"refusing to listen on {settings.host} without API keys (gateway.api_keys)")
        say(f"no API keys configured: the gateway listens on {settings.host} only")
    serve_asgi(create_app(settings), settings.host, settings.port)


def serve_asgi(app: Any, host: str, port: int) -> None:
    """Serve an ASGI app as the gateway is served (the benchmark's bare forwarder too, to compare like with like):
    uvicorn on uvloop and httptools, no access log of uvicorn's (the gateway writes its own), the collector quieted
    once the app is built. uvicorn installs no logging of its own either: its records go where the process's
    logging sends them (gateway/logs.py configure_logging, which the `sluice` commands call)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_config=None,
        access_log=False, loop="uvloop", http="httptools", lifespan="on",
        # Clients reach the gateway directly or through a proxy that the operator configures; trusting
        # X-Forwarded-* by default would let any client spoof its address.
        proxy_headers=False, server_header=False,
    )
    quiet_garbage_collector()
    uvicorn.Server(config).run()
