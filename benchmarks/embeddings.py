"""Embedding throughput through the gateway, through Triton directly, and in-process onnxruntime, in one run.

    python -m benchmarks.embeddings [--config config.yaml] [--service embedding_service]

Compiles the one service into a scratch repository (its rate limit lifted, its cache on), starts tritonserver and
a `sluice gateway` process on free loopback ports, then measures on the same texts: in-process onnxruntime on the
same exported graph (all cores, batch 1 and batch 16: the ceiling); Triton over gRPC; the gateway over HTTP with
every text new (cache misses); the gateway again with the same texts (cache hits). Each served measurement uses N
concurrent clients, each sending one text per request and awaiting the answer. Run it alone: on 2 cores anything
else running skews every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import yaml
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from benchmarks.texts import benchmark_texts
from compiler.pipeline import compile_repository
from runtimes.encoders import OnnxEncoder, open_session
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


async def measure_gateway(url: str, service: str, clients: int, texts: list[str]) -> dict[str, Any]:
    """Misses (new texts), then hits (the same texts again)."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        send = gateway_sender(session, f"{url}/v1/embeddings", service)
        await closed_loop(clients, [f"gateway warm-up {i}" for i in range(200)], send)
        misses = await closed_loop(clients, texts, send)
        hits = await closed_loop(clients, texts, send)
    return {name: {"texts_per_s": round(run[0], 1), **percentiles(run[1]), "refused": run[2]}
            for name, run in (("misses", misses), ("hits", hits))}


@contextmanager
def gateway_process(repository: Path, grpc_url: str) -> Iterator[str]:
    """`sluice gateway` in its own process, as deployed."""
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "sluice", "gateway", "--repository", str(repository), "--triton-grpc", grpc_url,
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start: {process.stderr.read() if process.stderr else ''}")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:  # noqa: S310 - loopback URL
            return bool(response.status == 200)
    except OSError:
        return False


async def measure_triton(grpc_url: str, service: str, clients: int, texts: list[str]) -> dict[str, Any]:
    client = grpc_aio.InferenceServerClient(grpc_url)
    try:
        send = triton_sender(client, service)
        await closed_loop(clients, [f"warm-up {i}" for i in range(200)], send)
        throughput, latencies, refused = await closed_loop(clients, texts, send)
    finally:
        await client.close()
    return {"texts_per_s": round(throughput, 1), **percentiles(latencies), "refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--service", default="embedding_service")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=3000)
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
        settings = TritonSettings(repository, root / "work", http_port=http_port, grpc_port=grpc_port,
                                  metrics_port=metrics_port)
        with TritonServer(settings) as server:
            served = asyncio.run(measure_triton(server.grpc_url, args.service, args.clients, texts))
            with gateway_process(repository, server.grpc_url) as url:
                # Other texts than Triton's run, so Triton's own response cache cannot answer them.
                gateway_texts = benchmark_texts(args.texts, seed=1)
                through_gateway = asyncio.run(measure_gateway(url, args.service, args.clients, gateway_texts))
    best = max(ceiling.values())
    report = {
        "service": args.service,
        "worker_count": runtime.worker_count,
        "batch_size": runtime.batch_size,
        "batch_timeout_s": runtime.batch_timeout,
        "clients": args.clients,
        "texts": len(texts),
        "cores": os.cpu_count(),
        "in_process_texts_per_s": ceiling,
        "triton": served,
        "gateway": through_gateway,
        "triton_over_in_process": round(served["texts_per_s"] / best, 3),
        "gateway_over_triton": round(through_gateway["misses"]["texts_per_s"] / served["texts_per_s"], 3),
        "cache_hits_over_misses": round(
            through_gateway["hits"]["texts_per_s"] / through_gateway["misses"]["texts_per_s"], 1
        ),
    }
    print(json.dumps(report, indent=2))
    misses, hits = through_gateway["misses"], through_gateway["hits"]
    print(f"\nin-process {best} texts/s | Triton {served['texts_per_s']} (p50 {served['p50_ms']} ms, "
          f"p99 {served['p99_ms']} ms) = {report['triton_over_in_process']} x in-process | gateway misses "
          f"{misses['texts_per_s']} (p50 {misses['p50_ms']}, p99 {misses['p99_ms']} ms) = "
          f"{report['gateway_over_triton']} x Triton | gateway hits {hits['texts_per_s']} (p50 {hits['p50_ms']}, "
          f"p99 {hits['p99_ms']} ms) = {report['cache_hits_over_misses']} x misses")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
