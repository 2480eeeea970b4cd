"""What a client sees when a process of the stack dies under load, and how long the stack takes to serve again.

    python -m benchmarks.faults triton  [--config config.yaml] [--service embedding_service] [--clients 4]
    python -m benchmarks.faults gateway [...]
    python -m benchmarks.faults redis   [--mode open|closed] [...]   (benchmarks/faults_redis.py)

The stack is started as a user starts it (`sluice up` on a scratch copy of the config: only ``--service``, free
loopback ports, no rate limit, no cache; see benchmarks/overload.py). ``--clients`` closed-loop clients send one
request each at a time; after ``--warmup`` seconds the process named by the subcommand gets SIGKILL. Printed: the
time from the kill to the first 503 and to the first 200 after it, the statuses and errors seen, and for Triton its
own load time on the restart (from its log: its first line to "Started HTTPService").
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.faults_redis import add_redis_arguments
from benchmarks.overload import child_pid, scratch_config, sluice_up
from sluice.triton_server import free_ports

_GLOG_TIME = re.compile(r"^[IWEF]\d{4} (\d\d:\d\d:\d\d\.\d+)")


def triton_load_seconds(log: Path) -> float | None:
    """From tritonserver's first log line to its HTTP port opening (models loaded), by the log's own clock."""
    times: list[datetime] = []
    for line in log.read_text(errors="replace").splitlines():
        match = _GLOG_TIME.match(line)
        if match and (not times or "Started HTTPService" in line):
            times.append(datetime.strptime(match[1], "%H:%M:%S.%f"))
    return (times[-1] - times[0]).total_seconds() if len(times) > 1 else None


async def load_and_kill(gateway: str, body: dict[str, Any], path: str, clients: int, warmup: float,
                        victim: int, recover_s: float) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    first: dict[str, float] = {}
    killed_at: list[float] = []
    numbers = itertools.count()
    end = asyncio.Event()

    async def client(http: httpx.AsyncClient) -> None:
        while not end.is_set():
            payload = {**body, "input": f"fault benchmark text {next(numbers)}"}
            try:
                response = await http.post(f"{gateway}{path}", json=payload, timeout=5)
                outcome = str(response.status_code)
                if response.status_code == 503 and "retry-after" not in response.headers:
                    outcome = "503 without Retry-After"
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            now = time.monotonic()
            if killed_at:
                statuses[outcome] += 1
                first.setdefault(outcome, now - killed_at[0])
                if outcome == "200":
                    end.set()
            if outcome != "200":
                await asyncio.sleep(0.01)  # a refusal is instant: do not spin

    async def killer() -> None:
        await asyncio.sleep(warmup)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())
        try:
            await asyncio.wait_for(end.wait(), recover_s)
        except TimeoutError:
            end.set()

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(killer(), *(client(http) for _ in range(clients)))
    return {"first_after_kill_s": {k: round(v, 3) for k, v in first.items()}, "statuses_after_kill": dict(statuses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    faults = parser.add_subparsers(dest="fault", required=True, metavar="FAULT")
    for name, what in (("triton", "SIGKILL tritonserver under `sluice up`"),
                       ("gateway", "SIGKILL the gateway process under `sluice up`")):
        kill_process(faults.add_parser(name, help=what, description=what))
    redis_fault = "SIGKILL redis-server under load, then start it again (benchmarks/faults_redis.py)"
    add_redis_arguments(faults.add_parser("redis", help=redis_fault, description=redis_fault))
    args = parser.parse_args()
    args.run(args)


def kill_process(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(run=run_kill_process)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--service", default="embedding_service")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the kill")
    parser.add_argument("--recover-s", type=float, default=120.0, help="give up waiting for a 200 after this")


def run_kill_process(args: argparse.Namespace) -> None:

    ports = free_ports(4)
    data, [service] = scratch_config(args.config, [args.service], ports)
    gateway = f"http://127.0.0.1:{ports[3]}"
    with tempfile.TemporaryDirectory(prefix="sluice-faults-") as scratch:
        config = Path(scratch) / "config.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        export_cache = Path(os.environ.get("SLUICE_CACHE_DIR") or args.config.resolve().parent / ".sluice" / "cache")
        with sluice_up(config, Path.cwd(), None, gateway, export_cache) as up_pid:
            victim = child_pid(up_pid, "tritonserver" if args.fault == "triton" else "sluice gateway")
            body = {"model": service.name} if service.type == "embedding" else {}
            if service.type != "embedding":
                raise SystemExit("only embedding services are loaded by this benchmark so far")
            result = asyncio.run(load_and_kill(gateway, body, service.path, args.clients, args.warmup, victim,
                                               args.recover_s))
            if args.fault == "triton":
                result["triton_load_s"] = triton_load_seconds(Path(scratch) / ".sluice" / "triton" / "tritonserver.log")
    print(json.dumps({"fault": args.fault, "service": service.name, "clients": args.clients, **result}, indent=2))


if __name__ == "__main__":
    main()
