"""What the stack says about itself: Prometheus text from the gateway's and Triton's /metrics, and Triton's model
statistics and configuration (its HTTP API), read over plain HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sluice.errors import SluiceError

# The operator's own stack is reached directly, whatever proxy the environment names.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 5.0) -> bytes:
    """``url``'s body; SluiceError naming the URL when it cannot be read."""
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - the operator's URLs
    try:
        with DIRECT.open(request, timeout=timeout_s) as response:
            return bytes(response.read())
    except OSError as error:
        raise SluiceError(f"cannot read {url}: {error}") from error


@dataclass(frozen=True)
class Metrics:
    """One scrape: every sample by name and labels."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    @staticmethod
    def parse(text: str) -> Metrics:
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return Metrics(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when there is none)."""
        wanted = set(labels.items())
        return sum(value for (sample, have), value in self.samples.items() if sample == name and wanted <= have)

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        wanted = set(labels.items())
        found: dict[str, float] = {}
        for (sample, have), value in self.samples.items():
            if sample == name and wanted <= have:
                key = dict(have).get(label, "")
                found[key] = found.get(key, 0.0) + value
        return found


def scrape(url: str, headers: Mapping[str, str] | None = None) -> Metrics:
    return Metrics.parse(http_get(url, headers).decode())


def delta(after: Metrics, before: Metrics, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


class Sampler:
    """A gauge read every ``every_s`` while a probe runs (as a background task); ``peak`` is the highest value seen.
    The scrape itself runs in a thread, so the probe's own requests are not held up by it."""

    def __init__(self, url: str, name: str, labels: Mapping[str, str], headers: Mapping[str, str] | None = None,
                 every_s: float = 0.01) -> None:
        self._url, self._name, self._headers, self._every_s, self._labels = url, name, headers, every_s, labels
        self.peak = 0.0
        self.reads = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        while True:
            metrics = await asyncio.to_thread(scrape, self._url, self._headers)
            self.peak = max(self.peak, metrics.value(self._name, **self._labels))
            self.reads += 1
            await asyncio.sleep(self._every_s)


@dataclass(frozen=True)
class ModelStats:
    """Triton's statistics for one model: executions by batch size, and time spent computing."""

    batches: dict[int, int]  # batch size -> executions
    compute_ns: int
    requests: int  # answered successfully
    request_ns: int  # their time inside Triton: its queue, then computing
    at: float  # time.monotonic() of the reading

    def minus(self, before: ModelStats) -> ModelStats:
        sizes = {size: count - before.batches.get(size, 0) for size, count in self.batches.items()}
        return ModelStats({size: count for size, count in sizes.items() if count > 0},
                          self.compute_ns - before.compute_ns, self.requests - before.requests,
                          self.request_ns - before.request_ns, self.at - before.at)


def model_stats(triton_http: str, model: str) -> ModelStats:
    body = json.loads(http_get(f"{triton_http}/v2/models/{model}/stats"))
    stats = body["model_stats"][0]
    batches = {int(entry["batch_size"]): int(entry["compute_infer"]["count"]) for entry in stats.get("batch_stats", [])}
    inference = stats["inference_stats"]
    return ModelStats(batches, int(inference["compute_infer"]["ns"]), int(inference["success"]["count"]),
                      int(inference["success"]["ns"]), time.monotonic())


def loaded_instances(triton_http: str, model: str) -> int:
    """Model instances Triton loaded: its config's instance groups (a group on n GPUs has count x n)."""
    config: dict[str, Any] = json.loads(http_get(f"{triton_http}/v2/models/{model}/config"))
    total = 0
    for group in config.get("instance_group", []):
        gpus = group.get("gpus") or []
        total += int(group.get("count", 1)) * (len(gpus) if group.get("kind") == "KIND_GPU" and gpus else 1)
    return total
