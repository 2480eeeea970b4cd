"""`sluice bench`: each service of a running stack under closed-loop and open-loop load, as JSON and PNG plots.

For each service: a short warm-up (not reported); closed loop at each concurrency (clients that each send their
next request when the last is answered); then open loop (Poisson arrivals, fixed seed) at multiples of the
capacity the closed loop found (its highest throughput). The steps are benchmarks/sweep.py's, over the engines of
benchmarks/overload.py (encoders) and benchmarks/llm.py (the LLM); the stack is measured as configured (its rate
limits and caches on). Batch sizes: for an encoder, the delta of Triton's statistics API over the sweep (executions
per batch size); for the LLM, the running batch (``sluice_llm_running``) sampled every 0.1 s while its streams run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import plots, sweep
from compiler.export_source import resolve_model_dir
from sluice.errors import SluiceError
from sluice.stack import Stack, ready

DEFAULT_CONCURRENCY = (1, 4, 16)
DEFAULT_LOAD = (0.5, 1.0, 1.5, 2.0)
DEFAULT_SECONDS = 5.0
PAUSE_S = 0.5  # between steps: connections settle, stragglers finish
Advance = Callable[[str], None]


@dataclass(frozen=True)
class Sweep:
    seconds: float = DEFAULT_SECONDS
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    load: tuple[float, ...] = DEFAULT_LOAD

    @property
    def warmup_s(self) -> float:
        return min(2.0, self.seconds)


def parse_concurrency(text: str | None) -> tuple[int, ...]:
    """``"1,4,16"`` (None: the default); SluiceError naming --concurrency otherwise."""
    if text is None:
        return DEFAULT_CONCURRENCY
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise SluiceError(f"--concurrency: expected positive whole numbers separated by commas, found {text!r}")
    return values


def parse_load(text: str | None) -> tuple[float, ...]:
    """``"0.5,1,1.5,2"``, multiples of the closed loop's capacity (None: the default); SluiceError naming --load
    otherwise."""
    if text is None:
        return DEFAULT_LOAD
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise SluiceError(f"--load: expected positive numbers separated by commas (multiples of the capacity), "
                          f"found {text!r}")
    return values


def target(stack: Stack, config: Path, name: str, tag: str) -> sweep.Target:
    service = stack.service(name)
    runtime, model = service.runtime, service.model
    tokenizer_dir = max_length = None
    if model.type == "llm":
        tokenizer_dir = resolve_model_dir(model.model_name, config.resolve().parent, config_file=config)
        max_length = model.max_length
    return sweep.Target(
        gateway=stack.gateway, triton_http=stack.triton_http, triton_metrics=stack.triton_metrics,
        headers=stack.headers, service=name, type=model.type, batch_size=runtime.batch_size,
        total_timeout=runtime.total_timeout, queue_timeout=runtime.queue_timeout,
        max_queue_size=runtime.max_queue_size, tag=tag, tokenizer_dir=tokenizer_dir,
        max_length=max_length or 512,
    )


async def measure_encoder(target: sweep.Target, plan: Sweep, index: int, advance: Advance) -> dict[str, Any]:
    await sweep.encoder_closed(target, min(plan.concurrency), plan.warmup_s, seed=100 * index)
    batches: Counter[int] = Counter()
    closed = []
    for step, clients in enumerate(plan.concurrency):
        await asyncio.sleep(PAUSE_S)
        closed.append(await _counting_batches(target, batches, sweep.encoder_closed(
            target, clients, plan.seconds, seed=100 * index + 10 + step)))
        advance(f"{target.service}: {clients} clients")
    capacity = max(line["throughput_per_s"] for line in closed)
    opened = []
    for step, load in enumerate(plan.load):
        await asyncio.sleep(PAUSE_S)
        if capacity > 0:
            opened.append(await _counting_batches(target, batches, sweep.encoder_open(
                target, load, load * capacity, plan.seconds, seed=100 * index + 50 + step)))
        advance(f"{target.service}: {load:g}x capacity")
    source = "Triton's statistics API: executions per batch size over the sweep"
    return _result(target, capacity, closed, opened,
                   {"source": source, "unit": "executions", "histogram": _histogram(batches)})


async def _counting_batches(target: sweep.Target, batches: Counter[int],
                            run: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Runs one encoder step; adds the executions Triton counted meanwhile, per batch size, to ``batches``, and
    their mean batch to the step's line. A step during which Triton's statistics could not be read, or went back
    (Triton restarted: its counts start again from 0), says so in ``triton_stats``, has a ``mean_batch`` of None and
    adds nothing."""
    before = await asyncio.to_thread(_batches_or_none, target)
    line = await run
    after = await asyncio.to_thread(_batches_or_none, target)
    line["mean_batch"] = None
    if before is None or after is None:
        line["triton_stats"] = "unreadable"
    elif any(after[size] < n for size, n in before.items()):
        line["triton_stats"] = "reset: Triton restarted"
    else:
        line["triton_stats"] = "ok"
        during = after - before
        batches.update(during)
        executions = sum(during.values())
        if executions:
            line["mean_batch"] = round(sum(size * n for size, n in during.items()) / executions, 2)
    return line


def _batches_or_none(target: sweep.Target) -> Counter[int] | None:
    try:
        return sweep.triton_batches(target.triton_http, target.service)
    except SluiceError:
        return None


async def measure_llm(target: sweep.Target, plan: Sweep, index: int, advance: Advance) -> dict[str, Any]:
    workload = sweep.LlmWorkload(target)
    client = sweep.llm_client(target)
    running: list[float] = []
    try:
        warmup = await asyncio.to_thread(workload.requests, client, 100 * index)
        await sweep.llm_closed(target, client, warmup, min(plan.concurrency), plan.warmup_s, [])
        closed = []
        for step, streams in enumerate(plan.concurrency):
            requests = await asyncio.to_thread(workload.requests, client, 100 * index + 10 + step)
            await asyncio.sleep(PAUSE_S)
            closed.append(await sweep.llm_closed(target, client, requests, streams, plan.seconds, running))
            advance(f"{target.service}: {streams} streams")
        capacity = max(line["throughput_per_s"] for line in closed)
        opened = []
        for step, load in enumerate(plan.load):
            requests = await asyncio.to_thread(workload.requests, client, 100 * index + 50 + step)
            await asyncio.sleep(PAUSE_S)
            if capacity > 0:
                opened.append(await sweep.llm_open(target, client, requests, load, load * capacity, plan.seconds,
                                                   seed=100 * index + 50 + step, running=running))
            advance(f"{target.service}: {load:g}x capacity")
    finally:
        await client.close()
    batches = {"source": f"running batch (sluice_llm_running) sampled every {sweep.RUNNING_SAMPLE_S:g} s",
               "unit": "samples", "histogram": _histogram(Counter(int(n) for n in running if n > 0))}
    return _result(target, capacity, closed, opened, batches)


def _histogram(counts: Counter[int]) -> dict[str, int]:
    return {str(size): count for size, count in sorted(counts.items()) if count > 0}


def _result(target: sweep.Target, capacity: float, closed: list[dict[str, Any]], opened: list[dict[str, Any]],
            batches: dict[str, Any]) -> dict[str, Any]:
    return {
        "service": target.service, "type": target.type,
        "knobs": {"batch_size": target.batch_size, "max_queue_size": target.max_queue_size,
                  "queue_timeout": target.queue_timeout, "total_timeout": target.total_timeout},
        "capacity_per_s": capacity, "closed": closed, "open": opened, "batches": batches,
    }


async def _measure(targets: list[sweep.Target], plan: Sweep, advance: Advance) -> dict[str, Any]:
    results = {}
    for index, one in enumerate(targets):
        measure = measure_llm if one.type == "llm" else measure_encoder
        results[one.service] = await measure(one, plan, index, advance)
    return results


def run_bench(stack: Stack, config: Path, services: Sequence[str], plan: Sweep, out: Path,
              console: Console) -> dict[str, Any]:
    """Measures ``services`` (all the config's when empty) on the running ``stack``; writes ``out``/bench.json and
    the plots, and returns the report."""
    names = list(services) or stack.names()
    tag = f"run {datetime.now(UTC):%Y%m%dT%H%M%S}"
    targets = [target(stack, config, name, tag) for name in names]  # unknown names fail here, before any load
    if not ready(stack.gateway):
        raise SluiceError(f"no gateway answers at {stack.gateway}/ready: start the stack (`sluice up {config}`), "
                          f"pass --gateway, or --up to bring it up here")
    for one in targets:
        if one.type != "llm":
            _check_triton(one)
    started = time.time()
    steps = len(names) * (len(plan.concurrency) + len(plan.load))
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("warming up", total=steps)

        def advance(done: str) -> None:
            progress.update(task, advance=1, description=done)

        results = uvloop.run(_measure(targets, plan, advance))
    report = {
        "config": str(config), "gateway": stack.gateway, "cores": os.cpu_count(),
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "seconds_per_step": plan.seconds, "concurrency": list(plan.concurrency), "load": list(plan.load),
        "texts": f"a new text per request (fixed seeds, tagged {tag!r}): the gateway's cache cannot answer",
        "services": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for result in results.values():
        plots.service_plots(result, out)
    return report


def _check_triton(one: sweep.Target) -> None:
    try:
        sweep.triton_batches(one.triton_http, one.service)
    except SluiceError as error:
        raise SluiceError(f"Triton's statistics API at {one.triton_http}/v2/models/{one.service}/stats did not "
                          f"answer ({error}): pass --triton") from None


def tables(report: dict[str, Any]) -> list[Table]:
    """One table per service: a row per step."""
    found = []
    for name, result in report["services"].items():
        llm = result["type"] == "llm"
        table = Table(title=f"{name} (capacity {result['capacity_per_s']:g}/s)", title_justify="left")
        for column in ("step", "offered/s", "2xx/s", "good/s", "refused", "p50 ms", "p90 ms", "p99 ms",
                       *(("TTFT p50", "TTFT p99", "tokens/s") if llm else ("mean batch",))):
            table.add_column(column, justify="left" if column == "step" else "right")
        for line in result["closed"] + result["open"]:
            step = f"{line['concurrency']} clients" if line["mode"] == "closed" else f"{line['load']:g}x capacity"
            refused = ", ".join(f"{key}: {n}" for key, n in line["refusals"].items()) or "-"
            latency = line["latency_ms"]
            cells = [step, f"{line['offered_per_s']:g}", f"{line['throughput_per_s']:g}",
                     f"{line['goodput_per_s']:g}", refused, *(_ms(latency[q]) for q in ("p50", "p90", "p99"))]
            if llm:
                cells += [_ms(line["ttft_ms"]["p50"]), _ms(line["ttft_ms"]["p99"]), f"{line['tokens_per_s']:g}"]
            else:
                cells.append(_ms(line["mean_batch"]))
            table.add_row(*cells)
        found.append(table)
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
