"""What a user of the LLM service sees under each scheduler: streamed completions, closed loop and open loop.

    python -m benchmarks.llm [--config config.yaml] [--service llm_service] [--seconds 20]
                             [--concurrency 1,4,8,16] [--overload 2] [--schedulers continuous,static]
                             [--source DIR] [--json FILE]

For each scheduler the stack is started as a user starts it (`sluice up`, a scratch copy of the config holding the
LLM service only, on free loopback ports, its rate limit lifted; every other knob as config.yaml says), with
``SLUICE_LLM_SCHEDULING=<scheduler>`` in the environment of `sluice up` (tritonserver and its Python stubs inherit
it; the model reads it at load). Continuous runs first: its capacity sets the open-loop rate of both schedulers.

The workload is drawn with a fixed seed: prompts of 8 to 256 tokens (log-uniform, counted with the model's own
tokenizer and built from its single-token vocabulary words), ``max_tokens`` 8 to 256 (log-uniform), temperature 0.
Every request is ``POST /v1/completions`` with ``"stream": true`` and ``stream_options.include_usage``, read as
server-sent events. Per scheduler:

1. a short warm-up (not reported);
2. closed loop at each ``--concurrency`` (each client sends its next request when its stream ends), ``--seconds``
   each: streams that completed (200, a finish_reason, ``[DONE]``, no error event) within the window, per second;
3. open loop: Poisson arrivals (fixed seed) at ``--overload`` x capacity for ``--seconds``, where capacity is the
   highest completed streams/s of the continuous scheduler's closed loops (the first scheduler's, without it).
   Goodput: streams completed whole within total_timeout + 50 ms of their arrival, per second, and over capacity.

Reported for every step: completed streams/s, output tokens/s (``completion_tokens`` of the final usage chunk),
TTFT p50/p99 (arrival, or scheduled arrival in the open loop, to the first content chunk), inter-token latency p99
(gaps between consecutive content chunks), the whole stream's p99, refusals (below), the largest running batch
(Triton's ``sluice_llm_running_peak{model=...}`` at the step's end, "n/a" when the model does not export it: the
largest since the model loaded, so the warm-up runs as many streams as the first step; and the step's own maximum
of ``sluice_llm_running``, sampled every 0.25 s), ``sluice_llm_refused_total`` by reason when exported, Triton's
mean requests per ``execute``, and the CPU the load generator and the gateway spent per stream.

Refusals are counted by status and reason: ``503 queue full`` ("Exceeds maximum queue size"), ``503 queue timeout``
("Request timeout expired" / queue_timeout), ``429 rate limit``, ``504 total_timeout``, ``504 call timeout`` (the
gateway's Triton call passed queue_timeout + inference_timeout), ``504 inference_timeout`` (the runtime stopped
generating), ``other: <message>``. A refusal sent after the stream began (status 200) is its last event and counts
as ``stream <status> <reason>``; ``no answer`` is a stream still open total_timeout + 5 s after its arrival. For
``503 queue timeout`` it also reports how long after arrival the refusal came (p50, p99, max).

The load generator is one process on uvloop with a lean HTTP/1.1 client (raw asyncio streams, keep-alive, chunked
SSE read event by event), its requests built before each step. ``--source DIR`` runs the stack from another
checkout (to measure an older version with this same load). Run it alone: on 2 cores anything else skews every
figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import re
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop
import yaml

from benchmarks.embeddings import cpu_seconds
from benchmarks.overload import gateway_pid, scratch_config, sluice_up
from compiler.defaults import TYPE_DEFAULTS
from sluice.triton_server import free_ports

SCHEDULING_ENV = "SLUICE_LLM_SCHEDULING"
SCHEDULERS = ("continuous", "static")
PROMPT_TOKENS = (8, 256)
MAX_TOKENS = (8, 256)
POOL = 2048  # requests built per step, cycled if a step needs more
LATE_SLACK_S = 0.05  # a stream is good if whole within total_timeout + this
NO_ANSWER_S = 5.0  # beyond total_timeout: a stream still open this much later is abandoned ("no answer")
WARMUP_S = 3.0
SAMPLE_EVERY_S = 0.25
RUNNING, RUNNING_PEAK = "sluice_llm_running", "sluice_llm_running_peak"  # the model's gauges, when it exports them
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)', re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# The status an error envelope's code stands for (gateway/errors.py), for the error events inside a 200 stream.
_CODE_STATUS = {"unavailable": 503, "deadline_exceeded": 504, "rate_limit_exceeded": 429, None: 500}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever HTTP_PROXY says


# --- the workload -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    prompt: str
    prompt_tokens: int
    max_tokens: int


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))


def workload(tokenizer: Any, count: int, seed: int, prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
             max_tokens: tuple[int, int] = MAX_TOKENS) -> list[Spec]:
    """``count`` requests: prompts of exactly n tokens (the tokenizer says so), n and max_tokens log-uniform within
    ``prompt_tokens`` and ``max_tokens`` (low, high)."""
    vocabulary = sorted(token for token in tokenizer.get_vocab() if token.isascii() and token.isalpha())
    single = [word for word, ids in zip(vocabulary, tokenizer(vocabulary)["input_ids"], strict=True)
              if len(ids) == 1]
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload
    sizes = [(_log_uniform(rng, *prompt_tokens), _log_uniform(rng, *max_tokens)) for _ in range(count)]
    prompts = [" ".join(rng.choice(single) for _ in range(n)) for n, _ in sizes]
    counted = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    for (n, _), found in zip(sizes, counted, strict=True):
        if n != found:
            raise RuntimeError(f"a prompt of {n} words came out as {found} tokens")
    return [Spec(prompt, n, m) for prompt, (n, m) in zip(prompts, sizes, strict=True)]


def request_body(service: str, spec: Spec) -> bytes:
    return orjson.dumps({
        "model": service, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    })


# --- the client ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One stream, as the client saw it; times are time.perf_counter()."""

    arrival: float
    expected_prompt_tokens: int = 0  # what the benchmark's tokenizer counted
    status: int = 0  # 0: no answer, or the connection broke before one
    first: float | None = None  # first content chunk
    last: float = 0.0  # latest content chunk
    end: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between consecutive content chunks
    finish_reason: str | None = None
    done: bool = False  # data: [DONE]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the refusal's key: "<status> <reason>", "stream <reason>", "no answer", ...

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.finish_reason is not None and self.error is None


def reason(message: str) -> str:
    """An error message's category."""
    if "Exceeds maximum queue size" in message:
        return "queue full"
    if "Request timeout expired" in message or "queue_timeout" in message:
        return "queue timeout"
    if "total_timeout" in message:
        return "total_timeout"
    if "inference_timeout" in message:
        return "inference_timeout"
    if "did not answer within" in message:
        return "call timeout"
    if "requests per second" in message:
        return "rate limit"
    return f"other: {message[:80]}"


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:80].decode(errors="replace")


class StreamClient:
    """Keep-alive HTTP/1.1 connections to one host, each carrying one request at a time, reading a chunked
    ``text/event-stream`` event by event (or a whole error body by its Content-Length)."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str] | None = None) -> None:
        self._host, self._port = host, port
        self._extra_headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    def request(self, path: str, body: bytes) -> bytes:
        """A POST of ``body`` (JSON) to ``path``, with the client's extra ``headers`` (an API key)."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n{self._extra_headers}\r\n")
        return head.encode() + body

    async def stream(self, request: bytes, record: Record) -> None:
        """Fills ``record``; raises OSError or asyncio.IncompleteReadError on a broken connection. A kept-alive
        connection the server closed while idle (uvicorn: after 5 s) is retried once on a new one."""
        if self._idle:
            try:
                return await self._exchange(*self._idle.pop(), request, record)
            except (asyncio.IncompleteReadError, ConnectionError) as error:
                if record.status or (isinstance(error, asyncio.IncompleteReadError) and error.partial):
                    raise  # the server had begun to answer: not a stale connection
        reader, writer = await asyncio.open_connection(self._host, self._port, limit=1 << 20)
        self._all.append(writer)
        await self._exchange(reader, writer, request, record)

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
        self._idle.clear()
        self._all.clear()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                        record: Record) -> None:
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, chunked, keep_alive = _parse_head(head)
            record.status = status
            if chunked:
                await _read_events(reader, record)
            else:
                body = await reader.readexactly(length) if length else b""
                if status != 200:
                    record.error = f"{status} {reason(_error_message(body))}"
        except BaseException:
            writer.close()
            raise
        record.end = time.perf_counter()
        if status != 200 and record.error is None:
            record.error = f"{status} other"
        if keep_alive:
            self._idle.append((reader, writer))
        else:
            writer.close()


def _parse_head(head: bytes) -> tuple[int, int, bool, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, keep_alive = 0, False, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection" and value == b"close":
            keep_alive = False
    return status, length, chunked, keep_alive


async def _read_events(reader: asyncio.StreamReader, record: Record) -> None:
    """A chunked body of server-sent events, each handled as it arrives."""
    buffer = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any, then the blank line
                pass
            return
        data = await reader.readexactly(size + 2)
        now = time.perf_counter()
        buffer += data[:-2]
        while (cut := buffer.find(b"\n\n")) >= 0:
            _event(buffer[:cut], now, record)
            buffer = buffer[cut + 2 :]


def _event(event: bytes, now: float, record: Record) -> None:
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            record.done = True
            continue
        message = orjson.loads(data)
        if "error" in message:  # a stream cannot change its status: its refusal is its last event
            error = message["error"]
            status = _CODE_STATUS.get(error.get("code"), error.get("code"))
            record.error = f"stream {status} {reason(str(error.get('message', '')))}"
            continue
        usage = message.get("usage")
        if usage:
            record.prompt_tokens = int(usage["prompt_tokens"])
            record.completion_tokens = int(usage["completion_tokens"])
        for choice in message.get("choices") or ():
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                if record.first is None:
                    record.first = now
                else:
                    record.gaps.append(now - record.last)
                record.last = now
            if choice.get("finish_reason"):
                record.finish_reason = str(choice["finish_reason"])


async def run_stream(client: StreamClient, request: bytes, record: Record, limit_s: float) -> None:
    try:
        async with asyncio.timeout(limit_s):
            await client.stream(request, record)
    except TimeoutError:
        record.error = "no answer"
    except (OSError, asyncio.IncompleteReadError) as error:
        record.error = "connection error"
        print(f"connection error: {error!r}", flush=True)
    if not record.end:
        record.end = time.perf_counter()
    if record.error is None and not record.completed:
        record.error = "200 incomplete stream"


# --- Triton's metrics ----------------------------------------------------------------------------------------


def scrape(url: str) -> str:
    try:
        with _NO_PROXY.open(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` whose labels include ``labels``."""
    found: list[tuple[dict[str, str], float]] = []
    if name not in text:  # the usual case for the metrics today's model does not export: no regex pass
        return found
    for match in _SAMPLE.finditer(text):
        if match["name"] != name:
            continue
        have = dict(_LABEL.findall(match["labels"]))
        if all(have.get(key) == value for key, value in labels.items()):
            found.append((have, float(match["value"])))
    return found


def _value(text: str, name: str, **labels: str) -> float | None:
    values = [value for _, value in samples(text, name, **labels)]
    return sum(values) if values else None


def _refused(text: str, service: str) -> dict[str, float]:
    return {have.get("reason", ""): value for have, value in samples(text, "sluice_llm_refused_total", model=service)}


async def sample_running(url: str, service: str, seen: dict[str, float], stop: asyncio.Event,
                         history: list[float] | None = None, every_s: float = SAMPLE_EVERY_S) -> None:
    """The largest value of each running-batch gauge in Triton's metrics, sampled every ``every_s``; each sample
    of RUNNING is also appended to ``history`` when given."""
    while not stop.is_set():
        text = await asyncio.to_thread(scrape, url)
        for name in (RUNNING, RUNNING_PEAK):
            value = _value(text, name, model=service)
            if value is not None:
                seen[name] = max(value, seen.get(name, value))
                if history is not None and name == RUNNING:
                    history.append(value)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


# --- the steps -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    gateway: str
    gateway_pid: int
    triton_metrics: str
    service: str
    total_timeout: float


Prepared = Sequence[tuple[bytes, int]]  # each request's bytes and its prompt's tokens


async def closed_loop(client: StreamClient, requests: Prepared, streams: int, seconds: float,
                      limit_s: float, refusal_pause_s: float = 0.0) -> list[Record]:
    """``streams`` clients, each sending its next request when its stream ends, for ``seconds``; a client
    refused before its stream began (429, 503, 504) waits ``refusal_pause_s`` first."""
    records: list[Record] = []
    pending = itertools.cycle(requests)
    end = time.perf_counter() + seconds

    async def one_client() -> None:
        while time.perf_counter() < end:
            request, prompt_tokens = next(pending)
            record = Record(time.perf_counter(), prompt_tokens)
            records.append(record)
            await run_stream(client, request, record, limit_s)
            if refusal_pause_s and record.status in (429, 503, 504):
                await asyncio.sleep(refusal_pause_s)

    await asyncio.gather(*(one_client() for _ in range(streams)))
    return records


async def open_loop(client: StreamClient, requests: Prepared, rate: float, seconds: float, seed: int,
                    limit_s: float) -> list[Record]:
    rng = random.Random(seed)  # noqa: S311 - reproducible arrivals
    arrivals, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        arrivals.append(t)
    records, tasks = [], []
    start = time.perf_counter()
    for at, (request, prompt_tokens) in zip(arrivals, itertools.cycle(requests), strict=False):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # The scheduled arrival: a load generator running late does not flatter the figures.
        record = Record(start + at, prompt_tokens)
        records.append(record)
        tasks.append(asyncio.create_task(run_stream(client, request, record, limit_s)))
    await asyncio.gather(*tasks)
    return records


def _ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 1) if values else None


def summary(label: str, records: list[Record], start: float, seconds: float, total_timeout: float,
            closed: bool) -> dict[str, Any]:
    """Closed loop: the streams completed within the window. Open loop: every stream (all arrived within it)."""
    counted = [r for r in records if r.end <= start + seconds] if closed else records
    completed = [r for r in counted if r.completed]
    good = [r for r in completed if r.end - r.arrival <= total_timeout + LATE_SLACK_S]
    ttft = [r.first - r.arrival for r in records if r.first is not None and r.status == 200]
    gaps = [gap for r in records if r.status == 200 for gap in r.gaps]
    whole = [r.end - r.arrival for r in records if r.completed]
    refusals = Counter(r.error for r in records if r.error)
    # How late a queue_timeout refusal comes: arrival to the 503 (the knob promises within 50 ms of queue_timeout).
    timed_out = [r.end - r.arrival for r in records if r.error == "503 queue timeout"]
    return {
        "load": label,
        "sent": len(records),
        "offered_per_s": round(len(records) / seconds, 2),
        "streams_per_s": round(len(completed) / seconds, 2),
        "output_tokens_per_s": round(sum(r.completion_tokens for r in completed) / seconds, 1),
        "good_per_s": round(len(good) / seconds, 2),
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "itl_p99_ms": _ms(gaps, 99),
        "stream_p50_ms": _ms(whole, 50),
        "stream_p99_ms": _ms(whole, 99),
        "finish_reasons": dict(Counter(r.finish_reason for r in records if r.completed and r.finish_reason)),
        "refusals": dict(sorted(refusals.items())),
        "queue_timeout_refusal_ms": {"p50": _ms(timed_out, 50), "p99": _ms(timed_out, 99), "max": _ms(timed_out, 100)}
        if timed_out else None,
        # Completed streams whose usage.prompt_tokens differs from the benchmark's count (expected: 0).
        "prompt_tokens_mismatch": sum(r.prompt_tokens != r.expected_prompt_tokens for r in records if r.completed),
    }


async def step(target: Target, label: str, run: Any, seconds: float, closed: bool) -> dict[str, Any]:
    """Runs ``run`` (a coroutine returning records) with Triton's metrics and both processes' CPU around it."""
    before = await asyncio.to_thread(scrape, target.triton_metrics)
    client_cpu, gateway_cpu = cpu_seconds(os.getpid()), cpu_seconds(target.gateway_pid)
    running: dict[str, float] = {}
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_running(target.triton_metrics, target.service, running, stop))
    start = time.perf_counter()
    records: list[Record] = await run
    client_cpu, gateway_cpu = cpu_seconds(os.getpid()) - client_cpu, cpu_seconds(target.gateway_pid) - gateway_cpu
    stop.set()
    await sampler
    after = await asyncio.to_thread(scrape, target.triton_metrics)
    line = summary(label, records, start, seconds, target.total_timeout, closed)
    # The gauge is the largest batch since the model loaded: a step's own peak when steps go up in load. The
    # running gauge, sampled, is the step's own (though it can miss a short peak).
    line["running_peak"] = _value(after, RUNNING_PEAK, model=target.service)
    line["running_sampled_max"] = running.get(RUNNING)
    refused_before = _refused(before, target.service)
    line["triton_refused"] = {key: value - refused_before.get(key, 0.0)
                              for key, value in _refused(after, target.service).items()} or None
    counts = [(_value(after, name, model=target.service) or 0.0) - (_value(before, name, model=target.service) or 0.0)
              for name in ("nv_inference_count", "nv_inference_exec_count")]
    line["requests_per_execute"] = round(counts[0] / counts[1], 2) if counts[1] else None
    line["load_generator_cpu_us_per_stream"] = round(1e6 * client_cpu / max(1, len(records)))
    line["gateway_cpu_us_per_stream"] = round(1e6 * gateway_cpu / max(1, len(records)))
    return line


async def measure(target: Target, scheduler: str, concurrency: list[int], seconds: float, overload: float,
                  capacity: float | None, pools: dict[str, list[Spec]]) -> dict[str, Any]:
    host, port = target.gateway.removeprefix("http://").split(":")
    client = StreamClient(host, int(port))
    limit_s = target.total_timeout + NO_ANSWER_S

    def prepared(key: str) -> list[tuple[bytes, int]]:
        return [(client.request("/v1/completions", request_body(target.service, spec)), spec.prompt_tokens)
                for spec in pools[key]]

    # As few streams as the first step, so that the largest-batch-since-load gauge starts from there.
    await closed_loop(client, prepared("warmup"), min(concurrency), WARMUP_S, limit_s)
    steps = []
    for streams in concurrency:
        await asyncio.sleep(1)
        requests = prepared(f"closed {streams}")
        line = await step(target, f"closed {streams}", closed_loop(client, requests, streams, seconds, limit_s),
                          seconds, closed=True)
        steps.append(line)
        print(f"[{scheduler}] {json.dumps(line)}", flush=True)
    if capacity is None:
        capacity = max((s["streams_per_s"] for s in steps), default=0.0)
    result: dict[str, Any] = {"steps": steps, "capacity_per_s": max((s["streams_per_s"] for s in steps), default=0.0)}
    if overload and capacity:
        await asyncio.sleep(1)
        rate = overload * capacity
        label = f"open {overload:g}x"
        line = await step(target, label, open_loop(client, prepared("open"), rate, seconds, 7, limit_s), seconds,
                          closed=False)
        line["rate_per_s"] = round(rate, 2)
        line["good_over_capacity"] = round(line["good_per_s"] / capacity, 3)
        steps.append(line)
        print(f"[{scheduler}] {json.dumps(line)}", flush=True)
    await client.close()
    return result


# --- the report ----------------------------------------------------------------------------------------------


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}{suffix}"
    return f"{value}{suffix}"


def table(report: dict[str, Any]) -> str:
    columns = ("scheduler", "load", "offered/s", "streams/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p99",
               "stream p99", "good/s", "peak batch", "running max", "req/exec", "gen CPU/stream", "gw CPU/stream")
    rows = [columns]
    notes = []
    for scheduler, run in report["runs"].items():
        for s in run["steps"]:
            rows.append((scheduler, s["load"], _fmt(s["offered_per_s"]), _fmt(s["streams_per_s"]),
                         _fmt(s["output_tokens_per_s"]), _fmt(s["ttft_p50_ms"], " ms"), _fmt(s["ttft_p99_ms"], " ms"),
                         _fmt(s["itl_p99_ms"], " ms"), _fmt(s["stream_p99_ms"], " ms"), _fmt(s["good_per_s"]),
                         _fmt(s["running_peak"]), _fmt(s["running_sampled_max"]), _fmt(s["requests_per_execute"]),
                         f"{s['load_generator_cpu_us_per_stream']} us", f"{s['gateway_cpu_us_per_stream']} us"))
            refusals = ", ".join(f"{key}: {n}" for key, n in s["refusals"].items()) or "none"
            triton = s["triton_refused"]
            extra = ""
            if triton is not None:
                extra = " | sluice_llm_refused_total: " + (", ".join(f"{k}: {v:g}" for k, v in triton.items() if v)
                                                           or "0")
            notes.append(f"  {scheduler} {s['load']}: refusals {refusals}{extra}")
            if s.get("queue_timeout_refusal_ms"):
                late = s["queue_timeout_refusal_ms"]
                notes.append(f"  {scheduler} {s['load']}: queue timeout refusals arrived p50 {late['p50']} ms, "
                             f"p99 {late['p99']} ms, max {late['max']} ms after arrival")
            if "good_over_capacity" in s:
                notes.append(f"  {scheduler} {s['load']}: {s['rate_per_s']} streams/s offered, {s['good_per_s']} "
                             f"good/s (whole within total_timeout + {1000 * LATE_SLACK_S:g} ms) = "
                             f"{s['good_over_capacity']} x capacity")
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(str(cell).rjust(width) if i > 1 else str(cell).ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))) for row in rows]
    capacity = f"capacity {report['capacity_per_s']} streams/s (from {report['capacity_from']})"
    legend = (f"peak batch: {RUNNING_PEAK} at the step's end (largest since load; n/a: not exported); running max: "
              f"{RUNNING} sampled every {SAMPLE_EVERY_S:g} s; req/exec: Triton's requests per execute()")
    return "\n".join([*lines, "", capacity, legend, *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--service", default="llm_service")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--overload", type=float, default=2, help="open-loop rate over capacity; 0: none")
    parser.add_argument("--schedulers", default="continuous,static")
    parser.add_argument("--source", type=Path, default=Path.cwd(), help="checkout whose `sluice up` serves")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    concurrency = [int(n) for n in args.concurrency.split(",") if n]
    schedulers = [s for s in args.schedulers.split(",") if s]
    unknown = sorted(set(schedulers) - set(SCHEDULERS))
    if unknown or not schedulers:
        parser.error(f"--schedulers: expected some of {', '.join(SCHEDULERS)}, found {args.schedulers!r}")
    if "continuous" in schedulers:  # its capacity sets the open-loop rate of every scheduler
        schedulers.remove("continuous")
        schedulers.insert(0, "continuous")

    from transformers import AutoTokenizer  # slow to import: only once the arguments are known good

    config = args.config.resolve()
    export_cache = config.parent / ".sluice" / "cache"
    report: dict[str, Any] = {"cores": os.cpu_count(), "service": args.service, "seconds_per_step": args.seconds,
                              "overload": args.overload, "capacity_per_s": None, "capacity_from": None, "runs": {}}
    capacity: float | None = None
    with tempfile.TemporaryDirectory(prefix="sluice-llm-bench-") as scratch:
        root = Path(scratch) / "stack"
        root.mkdir()
        pools: dict[str, list[Spec]] = {}
        for scheduler in schedulers:
            ports = free_ports(4)
            data, (service,) = scratch_config(config, [args.service], ports)
            (root / "config.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
            model = data["models"][data["services"][args.service]["model"]]
            if not pools:
                tokenizer = AutoTokenizer.from_pretrained(model["model_name"], local_files_only=True)
                keys = ["warmup", *(f"closed {n}" for n in concurrency), "open"]
                for index, key in enumerate(keys):
                    pools[key] = workload(tokenizer, POOL, seed=1000 + index)
                runtime = {**TYPE_DEFAULTS["llm"], **data["services"][args.service].get("runtime", {})}
                report["knobs"] = {key: runtime[key] for key in ("batch_size", "batch_timeout", "max_queue_size",
                                                                 "queue_timeout", "inference_timeout",
                                                                 "total_timeout")}
                report["knobs"]["max_length"] = model.get("max_length")
                report["workload"] = {"prompt_tokens": list(PROMPT_TOKENS), "max_tokens": list(MAX_TOKENS),
                                      "distribution": "log-uniform", "temperature": 0}
            gateway, metrics = f"http://127.0.0.1:{ports[3]}", f"http://127.0.0.1:{ports[2]}/metrics"
            print(f"[{scheduler}] sluice up with {SCHEDULING_ENV}={scheduler} (gateway {gateway})", flush=True)
            with sluice_up(root / "config.yaml", args.source.resolve(), None, gateway, export_cache,
                           extra_env={SCHEDULING_ENV: scheduler}) as pid:
                target = Target(gateway, gateway_pid(pid), metrics, args.service, service.total_timeout)
                run = uvloop.run(measure(target, scheduler, concurrency, args.seconds, args.overload, capacity,
                                         pools))
            if capacity is None:
                capacity = run["capacity_per_s"]
                report["capacity_per_s"] = capacity
                report["capacity_from"] = f"{scheduler}, highest closed loop"
            report["runs"][scheduler] = {"env": {SCHEDULING_ENV: scheduler}, **run}
    print()
    print(table(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
