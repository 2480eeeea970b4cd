"""Does Triton 2.51's queue policy stall the tail of a burst? (../shared/notes/triton-scheduling.md, section 4.)

    python -m benchmarks.burst_stall [--config config.yaml] [--bursts 30] [--burst 9]

Compiles the embedding service with one instance and ``max_batch_size`` 4, then serves it twice, straight from
Triton over gRPC: once with the queue policy the compiler wrote until issue 11 (``max_queue_size``,
``allow_timeout_override``: both turn Triton's prefetching off) and once with no queue policy. Each time it sends
``--bursts`` bursts of ``--burst`` concurrent single-row requests, a quiet second apart, and reports how long each
burst's last answer took. A lost wake-up shows as a burst whose tail waits ~500 ms (Triton's polling period) with
the instance idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpc_aio
import yaml
from tritonclient.grpc import InferInput

from benchmarks.texts import benchmark_texts
from compiler.pipeline import compile_repository
from compiler.schema import Server
from sluice.triton_server import TritonServer, TritonSettings, free_ports

SERVICE = "embedding_service"
POLICY = "  default_queue_policy {\n    timeout_action: REJECT\n    allow_timeout_override: true\n" \
         "    max_queue_size: 50\n  }\n"


def config(source: Path) -> dict[str, Any]:
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    model = dict(data["models"][data["services"][SERVICE]["model"]])
    model["model_name"] = str((source.parent / model["model_name"]).resolve())
    runtime = {"batch_size": 4, "batch_timeout": 0.001, "worker_count": 1, "max_queue_size": 50}
    return {"models": {"m": model}, "services": {SERVICE: {"model": "m", "runtime": runtime}}}


def with_policy(text: str, policy: bool) -> str:
    """config.pbtxt with exactly the queue policy asked for in its dynamic_batching block."""
    text = re.sub(r"  default_queue_policy \{[^}]*\}\n", "", text)
    if policy:
        text = text.replace("dynamic_batching {\n", "dynamic_batching {\n" + POLICY, 1)
    return text


async def bursts(url: str, count: int, size: int) -> list[float]:
    client = grpc_aio.InferenceServerClient(url)
    texts = iter(benchmark_texts(count * size + 50, seed=7))

    async def one() -> None:
        tensor = InferInput("text", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[next(texts).encode()]], dtype=np.object_))
        await client.infer(SERVICE, [tensor])

    try:
        for _ in range(5):  # warm-up
            await one()
        tails = []
        for _ in range(count):
            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(size)))
            tails.append(time.perf_counter() - started)
            await asyncio.sleep(1.0)
        return tails
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--bursts", type=int, default=30)
    parser.add_argument("--burst", type=int, default=9)
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory(prefix="sluice-burst-") as scratch:
        root = Path(scratch)
        (root / "config.yaml").write_text(yaml.safe_dump(config(args.config.resolve())), encoding="utf-8")
        repository = root / "model_repository"
        cache = args.config.resolve().parent / ".sluice" / "cache"
        compile_repository(root / "config.yaml", repository, cache_root=cache)
        pbtxt = repository / SERVICE / "config.pbtxt"
        original = pbtxt.read_text(encoding="utf-8")
        for name, policy in (("queue policy", True), ("no queue policy", False)):
            pbtxt.write_text(with_policy(original, policy), encoding="utf-8")
            http, grpc, metrics = free_ports(3)
            settings = TritonSettings(repository, root / "work", Server(http_port=http, grpc_port=grpc,
                                                                        metrics_port=metrics))
            with TritonServer(settings) as server:
                tails = asyncio.run(bursts(server.grpc_url, args.bursts, args.burst))
            ms = np.array(tails) * 1000
            report[name] = {"bursts": len(tails), "tail_p50_ms": round(float(np.percentile(ms, 50)), 1),
                            "tail_max_ms": round(float(ms.max()), 1),
                            "bursts_with_tail_over_400_ms": int((ms > 400).sum())}
            print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
