"""What a user of each encoder service sees beyond its capacity: open-loop load at 0.5x to 3x, with and without Redis.

    python -m benchmarks.overload [--config config.yaml] [--services embedding_service,reranker_service]
                                  [--loads 0.5,1,2,3] [--seconds 20] [--redis both|on|off] [--nominal-seconds 0]
                                  [--source DIR] [--json FILE]

The stack is started as a user starts it (`sluice up`, a scratch copy of the config on free loopback ports, the
services' rate limits lifted and their caches off, so that only scheduling decides), once without Redis and once
with a throwaway redis-server (SLUICE_REDIS_URL: the rate limiter then runs in Redis). For each service:

1. capacity: 16 closed-loop clients, one single-row request each at a time, for ``--capacity-seconds``;
2. for each load factor f: requests sent open loop (Poisson arrivals at f x capacity, fixed seed) for ``--seconds``;
   every answer is recorded: status, latency, Retry-After. Goodput is the 200s answered within total_timeout.

Queue depth is sampled every 100 ms from the gateway's ``sluice_gateway_queue_depth`` (when it has one) and Triton's
``nv_inference_pending_request_count``. ``--nominal-seconds N`` adds a closed-loop run of 16 clients for N seconds
(errors and throughput at nominal load). ``--source DIR`` runs the stack from another checkout (to measure an older
version with this same load generator). The load generator is one process on uvloop with a lean keep-alive HTTP
client (benchmarks/http_client.py: aiohttp cost 180-270 us of CPU a request, the model's CPU on these 2 cores), its
requests built before each step; its CPU per request is reported. Run it alone: on 2 cores anything else skews
every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import uvloop
import yaml

from benchmarks.embeddings import cpu_seconds
from benchmarks.http_client import LeanClient
from benchmarks.texts import benchmark_texts
from compiler.defaults import TYPE_DEFAULTS
from sluice.stack import brought_up, configured_stack
from sluice.triton_server import free_ports

CLIENTS = 16
NO_ANSWER_S = 5.0  # a request still unanswered after this long counts as left without an answer
LATE_SLACK_S = 0.05  # an answer later than total_timeout + this is late
BIG_EMBEDDING, BIG_RERANK = 1000, 100  # items in a big request (LangChain sends 1,000 texts a request)
BIG_PHASE_S = 30.0  # how long big requests are sent beside the nominal load
_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class Service:
    name: str
    type: str  # embedding | reranker
    total_timeout: float
    queue_timeout: float
    max_queue_size: int

    @property
    def path(self) -> str:
        return "/v1/embeddings" if self.type == "embedding" else "/v1/rerank"

    def big_body(self, seed: int) -> bytes:
        """One request of many items: 1,000 texts to embed, or 100 documents to rerank (issue 11's big requests)."""
        if self.type == "embedding":
            return json.dumps({"model": self.name, "input": benchmark_texts(BIG_EMBEDDING, seed=seed)}).encode()
        documents = benchmark_texts(BIG_RERANK, seed=seed)
        return json.dumps({"model": self.name, "query": "which text is about serving", "documents": documents}).encode()

    def body(self, text: str) -> bytes:
        if self.type == "embedding":
            return json.dumps({"model": self.name, "input": text}).encode()
        return json.dumps({"model": self.name, "query": "which text is about serving", "documents": [text]}).encode()


def scratch_config(config: Path, services: list[str], ports: list[int]) -> tuple[dict[str, Any], list[Service]]:
    """The config with only ``services`` (and their models), absolute model paths, free ports, no rate limit and no
    cache: what the user declared, minus what would answer for the scheduler."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    chosen, models, described = {}, {}, []
    for name in services:
        service = data["services"][name]
        runtime = {**service.get("runtime", {}), "rate_limit": 1_000_000, "enable_cache": False}
        chosen[name] = {**service, "runtime": runtime}
        model = dict(data["models"][service["model"]])
        path = config.parent / model["model_name"]
        if path.exists():
            model["model_name"] = str(path.resolve())
        models[service["model"]] = model
        described.append((name, model["type"], {**TYPE_DEFAULTS[model["type"]], **runtime}))
    http, grpc, metrics, gateway = ports
    scratch = {
        "models": models,
        "services": chosen,
        "server": {"http_port": http, "grpc_port": grpc, "metrics_port": metrics},
        "gateway": {"port": gateway},
    }
    return scratch, [
        Service(name, kind, float(runtime["total_timeout"]), float(runtime["queue_timeout"]),
                int(runtime["max_queue_size"]))
        for name, kind, runtime in described
    ]


@contextmanager
def redis_server() -> Iterator[str]:
    (port,) = free_ports(1)
    workdir = tempfile.mkdtemp(prefix="sluice-overload-redis-")
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def child_pid(parent: int, mentioning: str) -> int:
    """The live child of ``parent`` whose command line mentions ``mentioning``."""
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and mentioning in cmdline:
            return int(entry.name)
    raise RuntimeError(f"no child of {parent} runs {mentioning}")


def gateway_pid(up_pid: int) -> int:
    """The process serving the gateway under `sluice up`: its `sluice gateway` child, or `sluice up` itself in a
    checkout from before the gateway ran as a supervised child (``--source``)."""
    try:
        return child_pid(up_pid, "sluice gateway")
    except RuntimeError:
        return up_pid


@contextmanager
def sluice_up(config: Path, source: Path, redis_url: str | None, gateway: str, export_cache: Path,
              extra_env: Mapping[str, str] | None = None) -> Iterator[int]:
    """`sluice up CONFIG` from ``source`` (sluice.stack.brought_up, access log on: its cost counts), until the gateway
    at ``gateway`` (CONFIG's) is ready; yields the `sluice up` process id (see ``gateway_pid``). ``extra_env`` is added
    to its environment (tritonserver and its Python stubs inherit it)."""
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_REDIS_URL"} | dict(extra_env or {})
    if redis_url:
        env["SLUICE_REDIS_URL"] = redis_url
    env["SLUICE_CACHE_DIR"] = str(export_cache)
    assert configured_stack(config).gateway == gateway.rstrip("/"), "the gateway is CONFIG's"
    with brought_up(config, config.parent / "model_repository", env=env, cwd=source, access_log=True) as pid:
        yield pid


def _metric(text: str, name: str, **labels: str) -> float | None:
    total = None
    for match in _SAMPLE.finditer(text):
        if match["name"] != name:
            continue
        found = dict(part.split("=", 1) for part in match["labels"].split(",") if "=" in part)
        if all(found.get(key, "").strip('"') == value for key, value in labels.items()):
            total = (total or 0.0) + float(match["value"])
    return total


@dataclass
class Outcome:
    """Every answer of one step."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    refused_latencies: list[float] = field(default_factory=list)  # 429s and 503s: how long a refusal took
    goodput_answers: int = 0
    late: int = 0  # answered (any status) later than total_timeout + LATE_SLACK_S
    no_answer: int = 0  # still unanswered after NO_ANSWER_S
    connection_errors: int = 0  # the connection broke before an answer
    refusals_without_retry_after: int = 0
    deepest_gateway_queue: float = 0.0
    deepest_triton_queue: float = 0.0
    refused_by_reason: dict[str, float] = field(default_factory=dict)


async def _send(client: LeanClient, request: bytes, service: Service, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(NO_ANSWER_S):
            answer = await client.send(request)
    except TimeoutError:
        outcome.no_answer += 1
        return
    except (OSError, asyncio.IncompleteReadError) as error:
        outcome.connection_errors += 1
        print(f"connection error: {error!r}", flush=True)
        return
    record(outcome, service, answer.status, answer.retry_after, time.perf_counter() - started)


def record(outcome: Outcome, service: Service, status: int, retry_after: str | None, elapsed: float) -> None:
    """One answer, into ``outcome``."""
    outcome.statuses[status] += 1
    if elapsed > service.total_timeout + LATE_SLACK_S:
        outcome.late += 1
    if status == 200:
        outcome.ok_latencies.append(elapsed)
        if elapsed <= service.total_timeout:
            outcome.goodput_answers += 1
    elif status in (429, 503):
        outcome.refused_latencies.append(elapsed)
        if not retry_after:
            outcome.refusals_without_retry_after += 1


async def _sample_queues(gateway: str, triton_metrics: str, service: Service, outcome: Outcome,
                         stop: asyncio.Event, session: aiohttp.ClientSession) -> None:
    while not stop.is_set():
        for url, name, key in ((f"{gateway}/metrics", "sluice_gateway_queue_depth", "service"),
                               (triton_metrics, "nv_inference_pending_request_count", "model")):
            try:
                async with session.get(url) as response:
                    value = _metric(await response.text(), name, **{key: service.name})
            except aiohttp.ClientError:
                value = None
            if value is not None:
                if name.startswith("sluice"):
                    outcome.deepest_gateway_queue = max(outcome.deepest_gateway_queue, value)
                else:
                    outcome.deepest_triton_queue = max(outcome.deepest_triton_queue, value)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except TimeoutError:
            pass


async def open_loop(gateway: str, triton_metrics: str, service: Service, rate: float, seconds: float,
                    seed: int, headers: Mapping[str, str] | None = None) -> tuple[Outcome, float]:
    """Poisson arrivals at ``rate`` for ``seconds``; returns the outcome and the load generator's CPU seconds.
    ``headers`` go with every request (an API key)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible arrivals
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        arrivals.append(t)
    client = LeanClient(*host_port(gateway), headers)
    requests = [client.request(service.path, service.body(text)) for text in benchmark_texts(len(arrivals), seed=seed)]
    outcome = Outcome(sent=len(arrivals))
    cpu_before = cpu_seconds(os.getpid())
    async with aiohttp.ClientSession() as session:
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_queues(gateway, triton_metrics, service, outcome, stop, session))
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for at, request in zip(arrivals, requests, strict=True):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(client, request, service, outcome)))
        await asyncio.gather(*tasks)
        stop.set()
        await sampler
    await client.close()
    return outcome, cpu_seconds(os.getpid()) - cpu_before


async def big_requests(gateway: str, service: Service, count: int, gap_s: float, seed: int) -> list[dict[str, Any]]:
    """``count`` big requests, ``gap_s`` apart: each one's status and seconds."""
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(count):
            body = service.big_body(seed + i)
            started = time.perf_counter()
            async with session.post(f"{gateway}{service.path}", data=body,
                                    headers={"content-type": "application/json"}) as response:
                await response.read()
                results.append({"status": response.status, "seconds": round(time.perf_counter() - started, 3)})
            await asyncio.sleep(gap_s)
    return results


async def closed_loop(gateway: str, service: Service, seconds: float, seed: int, clients: int = CLIENTS,
                      outcome: Outcome | None = None, headers: Mapping[str, str] | None = None,
                      refusal_pause_s: float = 0.0) -> tuple[int, Counter[int], float]:
    """``clients`` clients, each sending one request and awaiting it, for ``seconds``: 200s, statuses, 200s per
    second. Each answer also goes into ``outcome`` when given (latencies, goodput); ``headers`` go with every
    request (an API key); a client refused (429, 503, 504) waits ``refusal_pause_s`` before its next request."""
    pool = benchmark_texts(10_000, seed=seed)
    texts = (f"{text} r{i // len(pool)}" for i, text in enumerate(itertools.cycle(pool)))  # endless, distinct
    statuses: Counter[int] = Counter()
    http = LeanClient(*host_port(gateway), headers)
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end:
            started = time.perf_counter()
            if outcome is not None:
                outcome.sent += 1
            try:
                async with asyncio.timeout(NO_ANSWER_S):
                    answer = await http.send(http.request(service.path, service.body(next(texts))))
                statuses[answer.status] += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
                statuses[0] += 1
                if outcome is not None and isinstance(error, TimeoutError):
                    outcome.no_answer += 1
                elif outcome is not None:
                    outcome.connection_errors += 1
                continue
            if outcome is not None:
                record(outcome, service, answer.status, answer.retry_after, time.perf_counter() - started)
            if refusal_pause_s and answer.status in (429, 503, 504):
                await asyncio.sleep(refusal_pause_s)

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.monotonic() - started
    await http.close()
    return statuses[200], statuses, statuses[200] / elapsed


def host_port(url: str) -> tuple[str, int]:
    """The host and port of an http:// URL (port 80 when it names none)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http://host:port URL, found {url!r}")
    return parts.hostname, parts.port or 80


def refusals_by_reason(gateway: str, service: Service) -> dict[str, float]:
    """The gateway's count of requests refused before any work, by reason, so far (absent on older versions)."""
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=5) as response:  # noqa: S310 - loopback URL
        text = response.read().decode()
    return {reason: _metric(text, "sluice_gateway_refused_total", service=service.name, reason=reason) or 0.0
            for reason in ("queue_full", "too_late", "queue_timeout")}


def summary(service: Service, factor: float, rate: float, capacity: float, seconds: float, outcome: Outcome,
            client_cpu_s: float, gateway_cpu_s: float) -> dict[str, Any]:
    ok = np.array(outcome.ok_latencies) * 1000 if outcome.ok_latencies else np.zeros(1)
    no = np.array(outcome.refused_latencies) * 1000 if outcome.refused_latencies else np.zeros(1)
    refused = sum(n for status, n in outcome.statuses.items() if status in (429, 503))
    return {
        "load": factor,
        "offered_per_s": round(outcome.sent / seconds, 1),
        "goodput_per_s": round(outcome.goodput_answers / seconds, 1),
        "goodput_over_capacity": round(outcome.goodput_answers / seconds / capacity, 3),
        "ok_p50_ms": round(float(np.percentile(ok, 50)), 1),
        "ok_p99_ms": round(float(np.percentile(ok, 99)), 1),
        "refused_p50_ms": round(float(np.percentile(no, 50)), 1),
        "refused_p99_ms": round(float(np.percentile(no, 99)), 1),
        "refused_max_ms": round(float(no.max()), 1),
        "statuses": {str(status): n for status, n in sorted(outcome.statuses.items())},
        "late_answers": outcome.late,
        "no_answer": outcome.no_answer,
        "connection_errors": outcome.connection_errors,
        "refusals_without_retry_after": outcome.refusals_without_retry_after,
        "refused_by_reason": outcome.refused_by_reason,
        "deepest_gateway_queue": outcome.deepest_gateway_queue,
        "deepest_triton_queue": outcome.deepest_triton_queue,
        "max_queue_size": service.max_queue_size,
        "queue_timeout_ms": round(1000 * service.queue_timeout),
        "load_generator_cpu_us_per_request": round(1e6 * client_cpu_s / max(1, outcome.sent)),
        "gateway_cpu_us_per_request": round(1e6 * gateway_cpu_s / max(1, outcome.sent)),
        "gateway_cpu_s": round(gateway_cpu_s, 3),
        "refused": refused,
    }


async def measure(gateway: str, gateway_pid: int, triton_metrics: str, services: list[Service],
                  loads: list[float], seconds: float, capacity_seconds: float, nominal_seconds: float,
                  label: str) -> dict[str, Any]:
    report: dict[str, Any] = {}
    # The first request after start, of each service, is a big one.
    first = {service.name: (await big_requests(gateway, service, 1, 0, seed=500 + i))[0]
             for i, service in enumerate(services)}
    for index, service in enumerate(services):
        print(f"[{label}] {service.name} first request after start, big: {json.dumps(first[service.name])}", flush=True)
        await closed_loop(gateway, service, 3, seed=1000 + index)  # warm-up
        _, _, capacity = await closed_loop(gateway, service, capacity_seconds, seed=2000 + index)
        steps = []
        for step, factor in enumerate(loads):
            rate = factor * capacity
            gateway_before = cpu_seconds(gateway_pid)
            reasons_before = refusals_by_reason(gateway, service)
            outcome, client_cpu = await open_loop(gateway, triton_metrics, service, rate, seconds,
                                                  seed=3000 + 10 * index + step)
            outcome.refused_by_reason = {reason: count - reasons_before[reason]
                                         for reason, count in refusals_by_reason(gateway, service).items()}
            line = summary(service, factor, rate, capacity, seconds, outcome, client_cpu,
                           cpu_seconds(gateway_pid) - gateway_before)
            steps.append(line)
            print(f"[{label}] {service.name} {factor}x: {json.dumps(line)}", flush=True)
            await asyncio.sleep(2)  # let the queues drain between steps
        entry: dict[str, Any] = {"capacity_per_s": round(capacity, 1), "steps": steps,
                                 "gateway_cpu_us_per_refusal": refusal_cost(steps),
                                 "first_request_big": first[service.name]}
        if nominal_seconds:
            answered, statuses, throughput = await closed_loop(gateway, service, nominal_seconds, seed=4000 + index)
            entry["nominal"] = {"clients": CLIENTS, "seconds": nominal_seconds, "per_s": round(throughput, 1),
                                "answered": answered, "statuses": {str(s): n for s, n in sorted(statuses.items())}}
            print(f"[{label}] {service.name} nominal: {json.dumps(entry['nominal'])}", flush=True)
        # Big requests while CLIENTS single-item clients keep the service at its nominal load.
        loaded, big = await asyncio.gather(
            closed_loop(gateway, service, BIG_PHASE_S, seed=5000 + index),
            big_requests(gateway, service, 3, BIG_PHASE_S / 4, seed=600 + index),
        )
        entry["big_at_nominal"] = {"big_requests": big, "small_statuses": {str(s): n for s, n in loaded[1].items()}}
        print(f"[{label}] {service.name} big requests at nominal load: {json.dumps(entry['big_at_nominal'])}",
              flush=True)
        report[service.name] = entry
    return report


def refusal_cost(steps: list[dict[str, Any]]) -> float | None:
    """Gateway CPU per refusal, from the step at 1x (CPU per answered request, nearly all 200s) and the most loaded
    step: what that step spent beyond its 200s at the 1x cost, per refusal."""
    nominal = next((s for s in steps if s["load"] == 1.0), None)
    loaded = max(steps, key=lambda s: s["refused"], default=None)
    if nominal is None or loaded is None or not loaded["refused"]:
        return None
    served_cost = nominal["gateway_cpu_s"] / max(1, nominal["statuses"].get("200", 0))
    extra = loaded["gateway_cpu_s"] - served_cost * loaded["statuses"].get("200", 0)
    return float(round(1e6 * extra / loaded["refused"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--services", default="embedding_service,reranker_service")
    parser.add_argument("--loads", default="0.5,1,2,3")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--capacity-seconds", type=float, default=10)
    parser.add_argument("--nominal-seconds", type=float, default=0)
    parser.add_argument("--redis", choices=("both", "on", "off"), default="both")
    parser.add_argument("--source", type=Path, default=Path.cwd(), help="checkout whose `sluice up` serves")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    loads = [float(f) for f in args.loads.split(",") if f]
    export_cache = args.config.resolve().parent / ".sluice" / "cache"  # the ONNX export is done once, not per run
    report: dict[str, Any] = {"cores": os.cpu_count(), "seconds_per_step": args.seconds, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="sluice-overload-") as scratch:
        root = Path(scratch) / "stack"
        root.mkdir()
        for label in {"both": ("memory", "redis"), "on": ("redis",), "off": ("memory",)}[args.redis]:
            ports = free_ports(4)
            data, services = scratch_config(args.config.resolve(), args.services.split(","), ports)
            config = root / "config.yaml"
            config.write_text(yaml.safe_dump(data), encoding="utf-8")
            gateway, triton_metrics = f"http://127.0.0.1:{ports[3]}", f"http://127.0.0.1:{ports[2]}/metrics"
            with (redis_server() if label == "redis" else _no_redis()) as redis_url, \
                    sluice_up(config, args.source.resolve(), redis_url, gateway, export_cache) as pid:
                report["runs"][label] = uvloop.run(measure(
                    gateway, gateway_pid(pid), triton_metrics, services, loads, args.seconds, args.capacity_seconds,
                    args.nominal_seconds, label,
                ))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


@contextmanager
def _no_redis() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
