"""The steps of `sluice bench`: one closed-loop or open-loop run against one service of a running stack, as one line
of figures, and the batch sizes its model saw meanwhile.

The engines are the benchmarks' own: benchmarks/overload.py drives the encoders (its lean client, Poisson arrivals
and Outcome), benchmarks/llm.py the LLM (its streaming client, workload and Record). Every step's inputs come from
fixed seeds. The embedding service caches repeated texts, so every request carries a text of its own (tagged with
the run, so that a second run against the same gateway misses the cache too): the figures are the model's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import llm, overload
from sluice.verify.observe import model_stats

LATENCY_QUANTILES = (50, 90, 99)
RUNNING_SAMPLE_S = 0.1  # how often the LLM's running batch is sampled
# A closed-loop client that is refused (429, 503, 504) waits this long before its next request, as a client that
# backs off would. Re-sent at once, refusals come back in a millisecond: 16 clients then sent 7,000 requests/s at a
# rate-limited service on 2 cores, and that storm starved the model (and left Triton unreachable) rather than
# measuring it.
REFUSAL_PAUSE_S = 0.1


@dataclass(frozen=True)
class Target:
    """Where one service of the running stack answers, and what it was told."""

    gateway: str
    triton_http: str
    triton_metrics: str
    headers: Mapping[str, str]
    service: str
    type: str  # embedding | reranker | llm
    batch_size: int
    total_timeout: float
    queue_timeout: float
    max_queue_size: int
    tag: str  # appended to every encoder text: this run's texts are new to the gateway's cache
    tokenizer_dir: Path | None = None  # the LLM's: its workload is counted in its own tokens
    max_length: int = 512  # the LLM's context window: prompt + max_tokens stay within it


@dataclass(frozen=True)
class TaggedService(overload.Service):
    """overload.Service whose texts carry the run's tag."""

    tag: str = ""

    def body(self, text: str) -> bytes:
        return super().body(f"{text} {self.tag}")


def _encoder(target: Target) -> TaggedService:
    return TaggedService(target.service, target.type, target.total_timeout, target.queue_timeout,
                         target.max_queue_size, tag=target.tag)


def percentiles_ms(seconds: list[float], quantiles: tuple[int, ...] = LATENCY_QUANTILES) -> dict[str, float | None]:
    """``{"p50": ms, ...}``; None where there is nothing to measure."""
    if not seconds:
        return {f"p{q}": None for q in quantiles}
    values = np.percentile(np.array(seconds) * 1000, quantiles)
    return {f"p{q}": round(float(v), 1) for q, v in zip(quantiles, values, strict=True)}


def _line(mode: str, setting: float, window_s: float, sent: int, answered: int, good: int,
          refusals: Mapping[str, int], latencies: list[float]) -> dict[str, Any]:
    """One step's figures. ``setting``: the concurrency (closed) or the multiple of capacity offered (open)."""
    return {
        "mode": mode,
        "concurrency" if mode == "closed" else "load": setting,
        "seconds": round(window_s, 2),
        "sent": sent,
        "offered_per_s": round(sent / window_s, 2),
        "throughput_per_s": round(answered / window_s, 2),  # answered 2xx
        "goodput_per_s": round(good / window_s, 2),  # answered 2xx within total_timeout
        "refusals": dict(sorted(refusals.items())),
        "latency_ms": percentiles_ms(latencies),
    }


# --- encoders ------------------------------------------------------------------------------------------------


def _encoder_line(mode: str, setting: float, window_s: float, outcome: overload.Outcome) -> dict[str, Any]:
    answered = sum(n for status, n in outcome.statuses.items() if 200 <= status < 300)
    refusals: Counter[str] = Counter({str(s): n for s, n in outcome.statuses.items() if not 200 <= s < 300})
    refusals.update({"no answer": outcome.no_answer, "connection error": outcome.connection_errors})
    line = _line(mode, setting, window_s, outcome.sent, answered, outcome.goodput_answers, +refusals,
                 outcome.ok_latencies)
    if mode == "open":
        line["deepest_gateway_queue"] = outcome.deepest_gateway_queue
    return line


async def encoder_closed(target: Target, clients: int, seconds: float, seed: int) -> dict[str, Any]:
    """``clients`` clients, each sending one single-text request and awaiting its answer, for ``seconds``."""
    outcome = overload.Outcome()
    before = _gateway_refusals(target)
    started = time.monotonic()
    await overload.closed_loop(target.gateway, _encoder(target), seconds, seed, clients=clients, outcome=outcome,
                               headers=target.headers, refusal_pause_s=REFUSAL_PAUSE_S)
    line = _encoder_line("closed", clients, time.monotonic() - started, outcome)
    line["gateway_refusals"] = _since(before, _gateway_refusals(target))
    return line


async def encoder_open(target: Target, load: float, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Single-text requests arriving at ``rate`` per second (Poisson, seeded) for ``seconds``, each awaited."""
    before = _gateway_refusals(target)
    outcome, _ = await overload.open_loop(target.gateway, target.triton_metrics, _encoder(target), rate, seconds,
                                          seed, headers=target.headers)
    line = _encoder_line("open", load, seconds, outcome)
    line["gateway_refusals"] = _since(before, _gateway_refusals(target))
    return line


def _gateway_refusals(target: Target) -> dict[str, float] | None:
    """The gateway's own count of refusals before any work, by reason (queue_full, too_late, queue_timeout)."""
    try:
        return overload.refusals_by_reason(target.gateway, _encoder(target))
    except OSError:
        return None


def _since(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {reason: count - before.get(reason, 0.0) for reason, count in after.items()
            if count > before.get(reason, 0.0)}


def triton_batches(triton_http: str, service: str) -> Counter[int]:
    """How many executions of each batch size Triton's statistics API counts for ``service`` so far (SluiceError
    when it does not answer)."""
    return Counter(model_stats(triton_http, service).batches)


# --- the LLM -------------------------------------------------------------------------------------------------


@dataclass
class LlmWorkload:
    """The LLM's requests, drawn once per step from a seed; built lazily (the tokenizer is slow to load)."""

    target: Target
    pool: int = 256  # requests per step, cycled if the step needs more
    _tokenizer: Any = field(default=None, repr=False)

    def requests(self, client: llm.StreamClient, seed: int) -> list[tuple[bytes, int]]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # slow to import: only when an LLM is measured

            self._tokenizer = AutoTokenizer.from_pretrained(self.target.tokenizer_dir, local_files_only=True)
        # Prompt and generation each within half the context window, as benchmarks/llm.py's 8-256 tokens.
        high = max(8, min(llm.PROMPT_TOKENS[1], self.target.max_length // 2))
        specs = llm.workload(self._tokenizer, self.pool, seed, prompt_tokens=(8, high), max_tokens=(8, high))
        return [(client.request("/v1/completions", llm.request_body(self.target.service, spec)), spec.prompt_tokens)
                for spec in specs]


def _llm_line(mode: str, setting: float, window_s: float, target: Target, records: list[llm.Record],
              counted: list[llm.Record]) -> dict[str, Any]:
    """``counted``: the streams whose completion falls in the window (closed loop), or all (open loop)."""
    completed = [r for r in counted if r.completed]
    good = [r for r in completed if r.end - r.arrival <= target.total_timeout]
    refusals = Counter(_refusal_status(r.error) for r in records if r.error)
    line = _line(mode, setting, window_s, len(records), len(completed), len(good), refusals,
                 [r.end - r.arrival for r in records if r.completed])
    line["ttft_ms"] = percentiles_ms([r.first - r.arrival for r in records if r.first is not None], (50, 99))
    line["tokens_per_s"] = round(sum(r.completion_tokens for r in completed) / window_s, 1)
    line["refusal_reasons"] = dict(sorted(Counter(r.error for r in records if r.error).items()))
    return line


def _refusal_status(error: str) -> str:
    """A refusal's status: "503 queue full" -> "503"; one inside a begun stream keeps its "stream" ("stream 504");
    "no answer" and "connection error" stay as they are."""
    words = error.split()
    if words[0] == "stream":
        return " ".join(words[:2])
    return words[0] if words[0].isdigit() and words[0] != "200" else error  # "200 incomplete stream" as is


async def _sampled(target: Target, running: list[float], run: Any) -> list[llm.Record]:
    """Awaits ``run`` while sampling the running batch (``sluice_llm_running``) into ``running``."""
    stop = asyncio.Event()
    sampler = asyncio.create_task(llm.sample_running(target.triton_metrics, target.service, {}, stop, running,
                                                     every_s=RUNNING_SAMPLE_S))
    try:
        records: list[llm.Record] = await run
    finally:
        stop.set()
        await sampler
    return records


def llm_client(target: Target) -> llm.StreamClient:
    return llm.StreamClient(*overload.host_port(target.gateway), target.headers)


async def llm_closed(target: Target, client: llm.StreamClient, requests: llm.Prepared, streams: int,
                     seconds: float, running: list[float]) -> dict[str, Any]:
    """``streams`` clients, each streaming one completion and sending the next when it ends, for ``seconds``."""
    start = time.perf_counter()
    records = await _sampled(target, running, llm.closed_loop(client, requests, streams, seconds,
                                                              target.total_timeout + llm.NO_ANSWER_S,
                                                              refusal_pause_s=REFUSAL_PAUSE_S))
    return _llm_line("closed", streams, seconds, target, records, [r for r in records if r.end <= start + seconds])


async def llm_open(target: Target, client: llm.StreamClient, requests: llm.Prepared, load: float, rate: float,
                   seconds: float, seed: int, running: list[float]) -> dict[str, Any]:
    """Streamed completions arriving at ``rate`` per second (Poisson, seeded) for ``seconds``, each read whole."""
    records = await _sampled(target, running, llm.open_loop(client, requests, rate, seconds, seed,
                                                            target.total_timeout + llm.NO_ANSWER_S))
    return _llm_line("open", load, seconds, target, records, records)
