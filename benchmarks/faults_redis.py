"""The ``redis`` fault of benchmarks/faults.py: redis-server killed under load, then started again on its port.

    python -m benchmarks.faults redis [--mode open|closed] [--replicas 2] [--rate 20] [--clients 4]
                                      [--up 4] [--down 6] [--after 6] [--json FILE]

(``python -m benchmarks.faults_redis [...]`` runs the same.) A throwaway redis-server and ``--replicas`` gateway
processes sharing it (``gateway.redis_failure`` set to ``--mode``), each serving one embedding service limited to
``--rate`` requests/second. Triton is replaced by tests/gateway_fakes.FakeTriton inside each gateway process, so
that only the gateway and Redis are measured (and the 2 cores are not spent on a model). ``--clients`` closed-loop
clients per gateway send single-text requests for ``--up`` seconds; then redis-server gets SIGKILL for ``--down``
seconds; then it is started again on the same port for ``--after`` seconds. Reported per phase: answers by status
(0: no HTTP answer) and admitted (200) per second, all gateways together; per gateway: when its
``sluice_gateway_redis_up`` fell and came back, and how many lines mentioning Redis it logged. Expected: open mode
admits about ``--rate`` while Redis is up and between ``--rate`` and ``--rate`` x replicas while it is down, with no
error; closed mode answers 503 while it is down; both share one budget again within about a second of Redis's
return. Run it alone: on 2 cores anything else skews it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.http_client import LeanClient
from sluice.triton_server import free_ports
from tests.redis_server import RestartableRedis

BODY = orjson.dumps({"model": "emb", "input": "hello"})
GATEWAY_START_TIMEOUT_S = 30


def serve_gateway(redis_url: str, mode: str, rate: float, port: int) -> None:
    """One gateway process: the real app, one embedding service, a fake Triton (no model: only the gateway)."""
    import uvicorn

    import gateway.app as app_module
    from gateway.settings import GatewaySettings
    from tests.gateway_fakes import FakeTriton, route

    triton = FakeTriton()
    triton.types["emb"] = "embedding"
    setattr(app_module, "Triton", lambda _target: triton)  # noqa: B010  # the lifespan builds its Batcher on it
    settings = GatewaySettings(
        routes={"emb": route("emb", "embedding", rate_limit=rate)}, triton_grpc="127.0.0.1:1", host="127.0.0.1",
        port=port, key_digests=frozenset(), key_rate_limit=None, redis_url=redis_url, cache_max_items=1000,
        max_request_bytes=65536, max_items=64, redis_failure=mode,  # type: ignore[arg-type]  # argparse checked it
    )
    uvicorn.run(app_module.create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False)


@dataclass
class GatewayTrace:
    port: int
    log: str
    down_at: float | None = None  # seconds after the kill when sluice_gateway_redis_up read 0
    up_at: float | None = None  # seconds after the restart when it read 1 again
    redis_log_lines: int = 0


@dataclass
class Report:
    mode: str
    replicas: int
    rate: float
    clients_per_gateway: int
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateways: list[GatewayTrace] = field(default_factory=list)
    first_200_after_restart_s: float | None = None
    first_error_after_kill_s: float | None = None


async def client_loop(port: int, answers: list[tuple[float, int]], stop: asyncio.Event) -> None:
    client = LeanClient("127.0.0.1", port)
    request = client.request("/v1/embeddings", BODY)
    while not stop.is_set():
        try:
            status = (await client.send(request)).status
        except (OSError, asyncio.IncompleteReadError):
            status = 0
            await asyncio.sleep(0.01)
        answers.append((time.monotonic(), status))
    await client.close()


async def watch_redis_up(trace: GatewayTrace, marks: dict[str, float], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{trace.port}", timeout=2) as http:
        while not stop.is_set():
            text = (await http.get("/metrics")).text
            up = next(line for line in text.splitlines() if line.startswith("sluice_gateway_redis_up "))
            now = time.monotonic()
            if up.endswith(" 0.0") and trace.down_at is None and "kill" in marks:
                trace.down_at = now - marks["kill"]
            if up.endswith(" 1.0") and trace.up_at is None and "restart" in marks:
                trace.up_at = now - marks["restart"]
            await asyncio.sleep(0.05)


def phase_summary(answers: list[tuple[float, int]], start: float, end: float) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for at, status in answers:
        if start <= at < end:
            counts[str(status)] = counts.get(str(status), 0) + 1
    seconds = end - start
    return {"seconds": round(seconds, 2), "answers": counts, "admitted_per_s": round(counts.get("200", 0) / seconds, 1)}


async def run_redis_fault(args: argparse.Namespace, redis_server: RestartableRedis, ports: list[int],
                          logs: list[str]) -> Report:
    report = Report(args.mode, args.replicas, args.rate, args.clients)
    report.gateways = [GatewayTrace(port, log) for port, log in zip(ports, logs, strict=True)]
    answers: list[tuple[float, int]] = []
    marks: dict[str, float] = {}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(client_loop(port, answers, stop)) for port in ports for _ in range(args.clients)]
    tasks += [asyncio.create_task(watch_redis_up(trace, marks, stop)) for trace in report.gateways]
    marks["start"] = time.monotonic()
    await asyncio.sleep(args.up)
    redis_server.kill()
    marks["kill"] = time.monotonic()
    await asyncio.sleep(args.down)
    redis_server.start()
    marks["restart"] = time.monotonic()
    await asyncio.sleep(args.after)
    marks["end"] = time.monotonic()
    stop.set()
    await asyncio.gather(*tasks)
    report.phases = {
        "redis up": phase_summary(answers, marks["start"], marks["kill"]),
        "redis down": phase_summary(answers, marks["kill"], marks["restart"]),
        "redis back": phase_summary(answers, marks["restart"], marks["end"]),
        "redis back, after its first second": phase_summary(answers, marks["restart"] + 1, marks["end"]),
    }
    after_restart = [at for at, status in answers if at >= marks["restart"] and status == 200]
    report.first_200_after_restart_s = round(min(after_restart) - marks["restart"], 3) if after_restart else None
    errors = [at for at, status in answers if at >= marks["kill"] and status not in (200, 429)]
    report.first_error_after_kill_s = round(min(errors) - marks["kill"], 3) if errors else None
    return report


def run_redis_command(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sluice-faults-") as workdir:
        redis_port, *ports = free_ports(1 + args.replicas)
        redis_server = RestartableRedis(redis_port, workdir)
        redis_server.start()
        logs = [str(Path(workdir) / f"gateway-{port}.log") for port in ports]
        gateways = []
        try:
            for port, log in zip(ports, logs, strict=True):
                with open(log, "wb") as out:
                    gateways.append(subprocess.Popen(
                        [sys.executable, "-c", "import sys; from benchmarks.faults_redis import serve_gateway; "
                         "serve_gateway(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))",
                         redis_server.url, args.mode, str(args.rate), str(port)],
                        stdout=out, stderr=subprocess.STDOUT,
                    ))  # fmt: skip
            for port in ports:
                wait_for_health(port)
            report = asyncio.run(run_redis_fault(args, redis_server, ports, logs))
        finally:
            for process in gateways:
                process.terminate()
                process.wait(timeout=10)
            redis_server.kill()
        for trace in report.gateways:
            trace.redis_log_lines = sum("Redis" in line for line in Path(trace.log).read_text().splitlines())
            trace.log = Path(trace.log).name
    print(json.dumps(asdict(report), indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")


def wait_for_health(port: int) -> None:
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway on port {port} did not start")
        time.sleep(0.1)


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``redis`` subcommand's options (benchmarks/faults.py adds the subcommand)."""
    parser.set_defaults(run=run_redis_command)
    parser.add_argument("--mode", choices=["open", "closed"], default="open", help="gateway.redis_failure")
    parser.add_argument("--replicas", type=int, default=2, help="gateway processes sharing the one Redis")
    parser.add_argument("--rate", type=float, default=20.0, help="the service's rate_limit (requests/s)")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients per gateway")
    parser.add_argument("--up", type=float, default=4.0, help="seconds of load before the kill")
    parser.add_argument("--down", type=float, default=6.0, help="seconds Redis stays down")
    parser.add_argument("--after", type=float, default=6.0, help="seconds of load after Redis is back")
    parser.add_argument("--json", help="also write the report here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_redis_arguments(parser)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
