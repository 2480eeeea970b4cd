"""Embedding throughput through the gateway, through Triton directly, and in-process onnxruntime, in one run.

    python -m benchmarks.embeddings [--config config.yaml] [--service embedding_service] [--rounds 5] [--texts 1000]

Compiles the one service into a scratch repository (its rate limit lifted, its cache on), measures in-process
onnxruntime on the same exported graph (all cores, batch 1 and batch 16: the ceiling), then starts tritonserver and
a `sluice gateway` process on free loopback ports and measures, in each of several rounds: Triton over gRPC; the
bare forwarder (benchmarks/bare_forwarder.py: the same HTTP server and gRPC call as the gateway, no features);
the gateway over HTTP with every text new (cache misses); the gateway again with the same texts (cache hits). Each
served measurement uses N concurrent clients, each sending one text per request and awaiting the answer. Besides
throughput and latency it reports each HTTP server's CPU per request, Triton's mean batch per phase, and how many
gateway requests each of the gateway's Triton calls carried (it merges concurrent ones).

On shared 2-core machines throughput drifts by 10 % or more from minute to minute, so the phases are interleaved
and ratios are taken within each round, then their median reported. Run it alone: anything else running skews
every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from benchmarks.texts import benchmark_texts
from compiler.pipeline import compile_repository
from compiler.schema import Server
from runtimes.encoders import OnnxEncoder, open_session
from sluice.stack import ready
from sluice.triton_server import TritonServer, TritonSettings, free_ports


def single_service_config(config: Path, service: str) -> dict[str, Any]:
    """The config with only ``service`` (and its model), absolute model paths, no rate limit, the cache on."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    chosen = data["services"][service]
    chosen["runtime"] = {**chosen.get("runtime", {}), "rate_limit": 1_000_000, "enable_cache": True}
    model = dict(data["models"][chosen["model"]])
    path = config.parent / model["model_name"]
    if path.exists():
        model["model_name"] = str(path.resolve())
    return {"models": {chosen["model"]: model}, "services": {service: chosen}}


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = np.array(sorted(latencies)) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ordered, q)), 2) for q in (50, 90, 99)}


def in_process(encoder: OnnxEncoder, texts: list[str], batch: int) -> float:
    """Texts per second through the encoder, ``batch`` texts a call."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        encoder.encode_texts(texts[start : start + batch])
    return len(texts) / (time.perf_counter() - started)


async def closed_loop(
    clients: int, texts: list[str], send: Callable[[str], Any]
) -> tuple[float, list[float], int]:
    """``clients`` concurrent loops, each sending one text and awaiting the answer before the next.

    Returns answered texts per second, the answered requests' latencies, and how many were refused.
    """
    pending = iter(texts)
    latencies: list[float] = []
    refused = 0

    async def client() -> None:
        nonlocal refused
        for text in pending:
            started = time.perf_counter()
            try:
                await send(text)
            except InferenceServerException:
                refused += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies) / (time.perf_counter() - started), latencies, refused


def triton_sender(client: grpc_aio.InferenceServerClient, service: str) -> Callable[[str], Any]:
    async def send(text: str) -> None:
        tensor = InferInput("text", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        await client.infer(service, [tensor])

    return send


def gateway_sender(session: aiohttp.ClientSession, url: str, service: str) -> Callable[[str], Any]:
    async def send(text: str) -> None:
        async with session.post(url, json={"model": service, "input": text}) as response:
            if response.status != 200:
                raise InferenceServerException(f"gateway answered {response.status}: {await response.text()}")
            await response.read()

    return send


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) that process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_sums(metrics_url: str, names: tuple[str, ...], **labels: str) -> tuple[float, ...]:
    """Each of ``names``' samples whose labels include ``labels``, summed, from a Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:  # noqa: S310 - loopback URL
        text = response.read().decode()
    sums = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser names a counter's samples <name>_total; ask for a counter by its family name.
            name = family.name if family.type == "counter" else sample.name
            if name in sums and all(sample.labels.get(k) == v for k, v in labels.items()):
                sums[name] += sample.value
    return tuple(sums[name] for name in names)


def triton_counts(metrics_url: str, service: str) -> tuple[float, float]:
    """Triton's count of inferences (rows) and of model executions (batches) for ``service`` so far."""
    rows, executions = metric_sums(metrics_url, ("nv_inference_count", "nv_inference_exec_count"), model=service)
    return rows, executions


def gateway_calls(gateway_url: str, service: str) -> tuple[float, float]:
    """The gateway's count of requests sent to Triton for ``service`` so far, and of the Triton calls they went
    in (concurrent requests are merged: gateway/coalescing.py)."""
    requests, calls = metric_sums(f"{gateway_url}/metrics", ("sluice_gateway_triton_call_requests_sum",
                                                             "sluice_gateway_triton_call_requests_count"),
                                  service=service)
    return requests, calls


@dataclass
class Phase:
    """One kind of measurement, accumulated over the rounds."""

    throughputs: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    refused: int = 0
    requests: int = 0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0  # the HTTP server's (the gateway's or the bare forwarder's)
    rows: float = 0.0  # what Triton computed during the phase: rows, in this many executions
    executions: float = 0.0
    gateway_requests: float = 0.0  # what the gateway sent to Triton: requests, in this many calls
    gateway_calls: float = 0.0

    def add(self, run: tuple[float, list[float], int], requests: int, client_cpu_s: float,
            server_cpu_s: float, batches: tuple[float, float], calls: tuple[float, float]) -> None:
        self.throughputs.append(run[0])
        self.latencies += run[1]
        self.refused += run[2]
        self.requests += requests
        self.client_cpu_s += client_cpu_s
        self.server_cpu_s += server_cpu_s
        self.rows += batches[0]
        self.executions += batches[1]
        self.gateway_requests += calls[0]
        self.gateway_calls += calls[1]

    def summary(self) -> dict[str, Any]:
        figures = {"texts_per_s": round(statistics.median(self.throughputs), 1),
                   "texts_per_s_by_round": [round(t, 1) for t in self.throughputs],
                   **percentiles(self.latencies), "refused": self.refused,
                   "load_generator_cpu_ms_per_request": round(1000 * self.client_cpu_s / self.requests, 2)}
        if self.executions:
            figures["triton_mean_batch"] = round(self.rows / self.executions, 1)
        if self.gateway_calls:
            figures["gateway_requests_per_triton_call"] = round(self.gateway_requests / self.gateway_calls, 1)
        if self.server_cpu_s:
            figures["server_cpu_ms_per_request"] = round(1000 * self.server_cpu_s / self.requests, 2)
        return figures


async def measure_served(
    server: TritonServer, gateway: tuple[str, int], forwarder: tuple[str, int], service: str, clients: int,
    texts: int, rounds: int,
) -> dict[str, Phase]:
    """``rounds`` rounds of: Triton directly, the bare forwarder, the gateway on new texts (misses), the gateway on
    those texts again (hits). Interleaved, so that the machine's drift (other tenants, frequency) falls on every
    phase alike. ``gateway`` and ``forwarder`` are (URL, process id)."""
    phases = {"triton": Phase(), "forwarder": Phase(), "misses": Phase(), "hits": Phase()}
    client = grpc_aio.InferenceServerClient(server.grpc_url)
    connector = aiohttp.TCPConnector(limit=2 * clients)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            to_triton = triton_sender(client, service)
            to_forwarder = gateway_sender(session, f"{forwarder[0]}/v1/embeddings", service)
            to_gateway = gateway_sender(session, f"{gateway[0]}/v1/embeddings", service)
            await closed_loop(clients, [f"warm-up {i}" for i in range(200)], to_triton)
            await closed_loop(clients, [f"forwarder warm-up {i}" for i in range(200)], to_forwarder)
            await closed_loop(clients, [f"gateway warm-up {i}" for i in range(200)], to_gateway)
            for round_ in range(rounds):
                # New texts for each phase of each round: neither Triton's response cache nor the gateway's
                # cache can answer a miss.
                triton_texts, forwarder_texts, gateway_texts = (
                    benchmark_texts(texts, seed=3 * round_ + i) for i in range(3)
                )
                for name, send, server_pid, phase_texts in (
                    ("triton", to_triton, None, triton_texts),
                    ("forwarder", to_forwarder, forwarder[1], forwarder_texts),
                    ("misses", to_gateway, gateway[1], gateway_texts),
                    ("hits", to_gateway, gateway[1], gateway_texts),
                ):
                    client_before = cpu_seconds(os.getpid())
                    server_before = cpu_seconds(server_pid) if server_pid else 0.0
                    batches_before = triton_counts(server.metrics_url, service)
                    calls_before = gateway_calls(gateway[0], service)
                    run = await closed_loop(clients, phase_texts, send)
                    server_cpu = cpu_seconds(server_pid) - server_before if server_pid else 0.0
                    batches = triton_counts(server.metrics_url, service)
                    calls = gateway_calls(gateway[0], service)
                    phases[name].add(run, texts, cpu_seconds(os.getpid()) - client_before, server_cpu,
                                     (batches[0] - batches_before[0], batches[1] - batches_before[1]),
                                     (calls[0] - calls_before[0], calls[1] - calls_before[1]))
    finally:
        await client.close()
    return phases


@contextmanager
def served_process(module_args: list[str], what: str) -> Iterator[tuple[str, int]]:
    """``python -m <module_args> --port <free port>`` in its own process, once its /ready answers: its URL and
    process id."""
    (port,) = free_ports(1)
    # stderr to a file, never a pipe nobody reads: the gateway writes an access line per request (its cost counts).
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", *module_args, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, url, what, timeout_s=60, log=log)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        log.close()


def gateway_process(repository: Path, grpc_url: str) -> AbstractContextManager[tuple[str, int]]:
    """`sluice gateway` in its own process, as deployed."""
    return served_process(
        ["sluice", "gateway", "--repository", str(repository), "--triton-grpc", grpc_url], "the gateway"
    )


def bare_forwarder_process(grpc_url: str) -> AbstractContextManager[tuple[str, int]]:
    """The reference forwarder (benchmarks/bare_forwarder.py) in its own process."""
    return served_process(["benchmarks.bare_forwarder", "--triton-grpc", grpc_url], "the bare forwarder")


def wait_until_ready(process: subprocess.Popen[str], url: str, what: str, timeout_s: float, log: IO[str]) -> None:
    """Until ``url``/ready answers 200; RuntimeError with the process's stderr (the file ``log``) if it exits or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready(url):
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(f"{what} did not start: {log.read()[-4000:]}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--service", default="embedding_service")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=1000, help="texts per phase per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    texts = benchmark_texts(args.texts)
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as scratch:
        root = Path(scratch)
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(single_service_config(args.config, args.service)), encoding="utf-8")
        repository = root / "model_repository"
        compiled = compile_repository(config, repository, cache_root=args.config.parent / ".sluice" / "cache")
        runtime = compiled.plan.services[0].runtime
        artifacts = repository / args.service / "1" / "artifacts"
        encoder = OnnxEncoder(artifacts, compiled.plan.services[0].model.max_length,
                              open_session(artifacts / "model.onnx", threads=os.cpu_count() or 1))
        in_process(encoder, texts[:100], 1)  # warm-up
        ceiling = {f"batch_{b}": round(in_process(encoder, texts, b), 1) for b in (1, 16)}
        del encoder
        http_port, grpc_port, metrics_port = free_ports(3)
        settings = TritonSettings(repository, root / "work", Server(http_port=http_port, grpc_port=grpc_port,
                                                                          metrics_port=metrics_port))
        with (TritonServer(settings) as server, gateway_process(repository, server.grpc_url) as gateway,
              bare_forwarder_process(server.grpc_url) as forwarder):
            phases = uvloop.run(
                measure_served(server, gateway, forwarder, args.service, args.clients, args.texts, args.rounds)
            )
    triton, bare, misses, hits = (phases[name] for name in ("triton", "forwarder", "misses", "hits"))
    # Ratios within each round (the same minute of the same machine), then their median over the rounds.
    gateway_ratios = [m / t for m, t in zip(misses.throughputs, triton.throughputs, strict=True)]
    bare_ratios = [b / t for b, t in zip(bare.throughputs, triton.throughputs, strict=True)]
    features_ratios = [m / b for m, b in zip(misses.throughputs, bare.throughputs, strict=True)]
    cache_ratios = [h / m for h, m in zip(hits.throughputs, misses.throughputs, strict=True)]
    best = max(ceiling.values())
    report = {
        "service": args.service,
        "worker_count": runtime.worker_count,
        "batch_size": runtime.batch_size,
        "batch_timeout_s": runtime.batch_timeout,
        "clients": args.clients,
        "texts_per_phase_per_round": args.texts,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "in_process_texts_per_s": ceiling,
        "triton": triton.summary(),
        "bare_forwarder": bare.summary(),
        "gateway": {"misses": misses.summary(), "hits": hits.summary()},
        "triton_over_in_process": round(statistics.median(triton.throughputs) / best, 3),
        "gateway_over_triton": round(statistics.median(gateway_ratios), 3),
        "gateway_over_triton_by_round": [round(r, 3) for r in gateway_ratios],
        # What any Python HTTP hop costs here, and what the gateway's features cost on top of one.
        "bare_forwarder_over_triton": round(statistics.median(bare_ratios), 3),
        "bare_forwarder_over_triton_by_round": [round(r, 3) for r in bare_ratios],
        "gateway_over_bare_forwarder": round(statistics.median(features_ratios), 3),
        "gateway_over_bare_forwarder_by_round": [round(r, 3) for r in features_ratios],
        "cache_hits_over_misses": round(statistics.median(cache_ratios), 1),
        "cache_hits_over_misses_by_round": [round(r, 1) for r in cache_ratios],
    }
    print(json.dumps(report, indent=2))
    t, b, m, h = report["triton"], report["bare_forwarder"], report["gateway"]["misses"], report["gateway"]["hits"]
    print(f"\nmedians of {args.rounds} rounds: in-process {best} texts/s | Triton {t['texts_per_s']} "
          f"(p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms, mean batch {t['triton_mean_batch']}) = "
          f"{report['triton_over_in_process']} x in-process | "
          f"bare forwarder {b['texts_per_s']} (mean batch {b['triton_mean_batch']}) = "
          f"{report['bare_forwarder_over_triton']} x Triton (rounds {report['bare_forwarder_over_triton_by_round']}) | "
          f"gateway misses {m['texts_per_s']} (p50 {m['p50_ms']}, p99 {m['p99_ms']} ms, mean batch "
          f"{m['triton_mean_batch']}, {m.get('gateway_requests_per_triton_call')} requests per Triton call) = "
          f"{report['gateway_over_triton']} x Triton (rounds {report['gateway_over_triton_by_round']}), "
          f"{report['gateway_over_bare_forwarder']} x bare forwarder | "
          f"gateway hits {h['texts_per_s']} (p50 {h['p50_ms']}, p99 {h['p99_ms']} ms) = "
          f"{report['cache_hits_over_misses']} x misses (rounds {report['cache_hits_over_misses_by_round']}) | "
          f"server CPU per request: bare forwarder {b['server_cpu_ms_per_request']} ms, gateway miss "
          f"{m['server_cpu_ms_per_request']} ms, hit {h['server_cpu_ms_per_request']} ms | load generator CPU per "
          f"request: Triton {t['load_generator_cpu_ms_per_request']} ms, "
          f"HTTP {m['load_generator_cpu_ms_per_request']} ms")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
