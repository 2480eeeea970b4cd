"""One probe per knob: drive one service the way that makes the knob act, then compare what the stack did (its
answers, the gateway's and Triton's metrics, Triton's statistics) with the configured value.

Tolerances are the issue's own: 10% for a rate, 50 ms for a timeout. Every probe waits for its requests to be
answered before it returns, and the rate-limited ones first let the service's rate window empty, so probes do not
disturb each other.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

from compiler.plan import ServicePlan
from gateway.ratelimit import limit_for_rate
from sluice.stack import Stack
from sluice.verify.observe import Metrics, Sampler, delta, loaded_instances, model_stats, scrape
from sluice.verify.report import Check, Verdict
from sluice.verify.traffic import Shapes, Timed, Traffic

TIMEOUT_SLACK_S = 0.05  # "within 50 ms of the knob"
RATE_TOLERANCE = 0.10  # "within 10% of the limit"
CACHE_HIT_RATIO = 0.99


@dataclass
class Target:
    """One service of a running stack, and the traffic sent to it so far."""

    stack: Stack
    service: ServicePlan
    traffic: Traffic

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def kind(self) -> str:
        return self.service.model.type

    @property
    def shapes(self) -> Shapes:
        return self.traffic.shapes

    def gateway_metrics(self) -> Metrics:
        return scrape(f"{self.stack.gateway}/metrics", self.stack.headers)

    def triton_metrics(self) -> Metrics:
        return scrape(self.stack.triton_metrics)

    def rate_window_s(self) -> float:
        return float(limit_for_rate(self.service.runtime.rate_limit).get_expiry())

    def rate_budget(self) -> int:
        """Requests the rate limiter admits at once from a rested window."""
        return int(limit_for_rate(self.service.runtime.rate_limit).amount)

    async def rested(self) -> None:
        """Until the rate limiter has forgotten every request sent so far (its previous window counts too)."""
        since = time.monotonic() - max((answer.sent for answer in self.traffic.answers), default=0.0)
        wait = 2 * self.rate_window_s() + 0.1 - since
        if wait > 0:
            await asyncio.sleep(wait)

    async def afford(self, requests: int) -> None:
        """Waits, if need be, until the rate limiter will admit ``requests`` more: those sent within the last two
        windows (the sliding window counts the previous one too) and these must stay well inside the budget."""
        now, window = time.monotonic(), self.rate_window_s()
        recent = sum(answer.sent > now - 2 * window for answer in self.traffic.answers)
        if recent + requests > 0.8 * self.rate_budget():
            await self.rested()

    def check(self, knob: str, measured: str, ok: bool, how: str) -> Check:
        return Check.judged(self.name, knob, getattr(self.service.runtime, knob), measured, ok, how)

    def not_applicable(self, knob: str, measured: str, how: str) -> Check:
        return Check(self.name, knob, getattr(self.service.runtime, knob), measured, Verdict.NOT_APPLICABLE, how)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _statuses(answers: list[Timed]) -> str:
    counts: dict[int, int] = {}
    for answer in answers:
        counts[answer.status] = counts.get(answer.status, 0) + 1
    return ", ".join(f"{count} x {status or 'no answer'}" for status, count in sorted(counts.items()))


def _results(answer: Timed) -> object:
    """What a cached answer must repeat exactly: the vectors or scores, not the ids or usage."""
    body = answer.json()
    return body.get("data") or body.get("results")


# --- enable_cache -------------------------------------------------------------------------------------------------


async def enable_cache(target: Target) -> list[Check]:
    runtime = target.service.runtime
    count = min(50, max(4, target.rate_budget() // 4))
    texts = [f"cache probe {index} {time.time_ns()}" for index in range(count)]
    await target.afford(2 * count)
    group = max(1, min(runtime.batch_size, 16))  # a few at a time: a burst might be shed, and a refusal is no miss

    async def send_all() -> list[Timed]:
        answers: list[Timed] = []
        for start in range(0, len(texts), group):
            answers += await target.traffic.burst([target.shapes.light(text) for text in texts[start:start + group]])
        return answers

    first = await send_all()
    before = target.gateway_metrics()
    second = await send_all()
    after = target.gateway_metrics()
    hits = delta(after, before, "sluice_gateway_cache_hits_total", service=target.name)
    misses = delta(after, before, "sluice_gateway_cache_misses_total", service=target.name)
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a.status == b.status == 200]
    same = sum(_results(a) == _results(b) for a, b in pairs)
    how = f"{len(texts)} distinct inputs sent twice; the gateway's cache counters over the second round"
    if not pairs:
        return [target.check("enable_cache", f"no answers ({_statuses(second)})", False, how)]
    if runtime.enable_cache:
        ratio = hits / len(texts)
        measured = f"{ratio:.0%} hits ({hits:.0f} of {len(texts)}), {same} of {len(pairs)} answers identical"
        return [target.check("enable_cache", measured, ratio >= CACHE_HIT_RATIO and same == len(pairs), how)]
    measured = f"{hits:.0f} hits, {misses:.0f} misses counted"
    return [target.check("enable_cache", measured, hits == 0, how)]


# --- batch_timeout ------------------------------------------------------------------------------------------------


async def batch_timeout(target: Target) -> list[Check]:
    """A lone request's wait for company: its latency less the time Triton took (encoders), or the engine's own
    queue-wait histogram (LLM)."""
    knob = target.service.runtime.batch_timeout
    lone = 6
    await target.afford(lone)
    if target.kind == "llm":
        before = target.triton_metrics()
        answers = [await _lone(target) for _ in range(lone)]
        after = target.triton_metrics()
        count = delta(after, before, "sluice_llm_queue_wait_seconds_count", model=target.name)
        total = delta(after, before, "sluice_llm_queue_wait_seconds_sum", model=target.name)
        if not count:
            return [target.check("batch_timeout", f"no request reached the engine ({_statuses(answers)})", False,
                                 "lone requests")]
        mean = total / count
        ok = 0.5 * knob - 0.002 <= mean <= knob + 0.025
        return [target.check("batch_timeout", f"lone requests waited {_ms(mean)} (mean of {count:.0f})", ok,
                             f"{lone} requests one at a time to an idle engine; its queue-wait histogram")]
    stats_before = model_stats(target.stack.triton_http, target.name)
    answers = [await _lone(target) for _ in range(lone)]
    seen = model_stats(target.stack.triton_http, target.name).minus(stats_before)
    in_triton = seen.request_ns / 1e9 / max(seen.requests, 1)
    served = [answer.seconds for answer in answers if answer.status == 200]
    if len(served) < lone:
        return [target.check("batch_timeout", f"lone requests failed ({_statuses(answers)})", False, "lone requests")]
    held = [seconds - in_triton for seconds in served]
    ok = max(held) <= knob + 0.025 and statistics.median(held) >= 0.5 * knob - 0.002
    measured = f"held {_ms(statistics.median(held))} (median), {_ms(max(held))} at most"
    return [target.check("batch_timeout", measured, ok,
                         f"{lone} requests one at a time; latency less their time in Triton ({_ms(in_triton)}, "
                         "its statistics)")]


async def _lone(target: Target) -> Timed:
    answer = await target.traffic.send(target.shapes.light())
    await asyncio.sleep(0.05)
    return answer


# --- batch_size and worker_count ----------------------------------------------------------------------------------


async def batch_size_and_workers(target: Target) -> list[Check]:
    runtime = target.service.runtime
    seconds = 2.0
    await target.rested()
    if target.kind == "llm":
        clients = runtime.batch_size * runtime.worker_count + 2
        before = target.triton_metrics()
        async with Sampler(target.stack.triton_metrics, "sluice_llm_running", {"model": target.name}) as running:
            answers = await _closed_loop(target, lambda: target.shapes.generation(48), clients, seconds)
        after = target.triton_metrics()
        peak = after.value("sluice_llm_running_peak", model=target.name)
        generated = delta(after, before, "sluice_llm_completion_tokens_total", model=target.name)
        measured = (f"largest running batch {running.peak:.0f} under load, {peak:.0f} since load "
                    f"({generated:.0f} tokens generated)")
        how = (f"{clients} clients generating 48 tokens each for {seconds:.0f} s ({_statuses(answers)}); "
               "the engine's running-batch gauges")
        checks = [target.check("batch_size", measured, peak <= runtime.batch_size and running.peak >= 1, how)]
        loaded = loaded_instances(target.stack.triton_http, target.name)
        checks.append(target.check("worker_count", f"{loaded} instances loaded", loaded == runtime.worker_count,
                                   "Triton's model configuration (each instance runs its own engine)"))
        return checks
    clients = runtime.batch_size * runtime.worker_count + runtime.batch_size // 2
    stats_before = model_stats(target.stack.triton_http, target.name)
    answers = await _closed_loop(target, target.shapes.light, clients, seconds)
    seen = model_stats(target.stack.triton_http, target.name).minus(stats_before)
    biggest = max(seen.batches, default=0)
    histogram = ", ".join(f"{size}: {count}" for size, count in sorted(seen.batches.items())[-4:])
    how = (f"{clients} clients for {seconds:.0f} s ({_statuses(answers)}); Triton's batch statistics "
           f"(largest sizes: {histogram or 'none'})")
    checks = [target.check("batch_size", f"largest batch the model ran: {biggest}",
                           0 < biggest <= runtime.batch_size, how)]
    loaded = loaded_instances(target.stack.triton_http, target.name)
    overlap = seen.compute_ns / 1e9 / seen.at if seen.at else 0.0
    at_once_ok = overlap <= runtime.worker_count + 0.15 and (runtime.worker_count == 1 or overlap > 1.05)
    checks.append(target.check(
        "worker_count", f"{loaded} instances loaded; {overlap:.2f} executing at once on average",
        loaded == runtime.worker_count and at_once_ok,
        "Triton's model configuration; its compute time over wall time under the same load",
    ))
    return checks


async def _closed_loop(target: Target, make: Callable[[], dict[str, object]], clients: int,
                       seconds: float) -> list[Timed]:
    """``clients`` each sending their next request when the last is answered, for ``seconds``; a refused client
    backs off a little instead of spinning on 429s."""
    stop = time.monotonic() + seconds
    answers: list[Timed] = []

    async def client() -> None:
        while time.monotonic() < stop:
            answer = await target.traffic.send(make())
            answers.append(answer)
            if answer.status != 200:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


# --- queue_timeout ------------------------------------------------------------------------------------------------


async def queue_timeout(target: Target) -> list[Check]:
    """Make the service busy for longer than queue_timeout, then send requests that must wait behind it: those
    still waiting at queue_timeout must be refused then."""
    runtime = target.service.runtime
    knob = runtime.queue_timeout
    await target.afford(2 * runtime.batch_size * runtime.worker_count + 9)
    if target.kind == "llm":
        # Twice what the running batch holds: should a generation stop early (its end-of-text), one waiting takes
        # its place, and the light requests behind them still wait.
        slots = runtime.batch_size * runtime.worker_count
        busy = [asyncio.create_task(target.traffic.send(target.shapes.heavy())) for _ in range(2 * slots)]
        await asyncio.sleep(0.05)
        before = target.triton_metrics()
        light = [target.shapes.light() for _ in range(max(0, min(runtime.max_queue_size - slots, 8)))]
        waiting = await target.traffic.burst(light)
        busy_answers = await asyncio.gather(*busy)
        waiting += busy_answers  # which of them waited is the engine's choice: any refused could not start in time
        counted = delta(target.triton_metrics(), before, "sluice_llm_refused_total", model=target.name,
                        reason="queue_timeout")
        longest = max(answer.seconds for answer in busy_answers)
        how = (f"{len(busy)} long generations for {slots} places (longest {_ms(longest)}), then {len(light)} short "
               "ones; the engine's refusals")
    else:
        # Enough of the heaviest requests to keep every instance busy past queue_timeout, as one alone shows.
        alone = await target.traffic.send(target.shapes.heavy())
        per_instance = min(8, max(1, math.ceil((knob + 0.1) / max(alone.seconds, 0.01))))
        busy = [asyncio.create_task(target.traffic.send(target.shapes.heavy()))
                for _ in range(per_instance * runtime.worker_count)]
        await asyncio.sleep(0.02)
        before = target.gateway_metrics()
        pending = []
        for _ in range(8):
            pending.append(asyncio.create_task(target.traffic.send(target.shapes.light())))
            await asyncio.sleep(0.01)
        waiting = list(await asyncio.gather(*pending))
        waiting += await asyncio.gather(*busy)  # any refused could not start in time
        counted = delta(target.gateway_metrics(), before, "sluice_gateway_refused_total", service=target.name,
                        reason="queue_timeout")
        how = (f"{len(busy)} request(s) of {runtime.batch_size} long items ({alone.status} after {_ms(alone.seconds)} "
               f"alone), then 8 small ones 10 ms apart; the gateway's refusals")
    # A request that cannot start within queue_timeout must hear so by then: at arrival, where the gateway predicts
    # it (nothing is queued just to expire), or when its wait runs out.
    refused = [answer for answer in waiting if answer.status == 503]
    if not refused:
        return [target.not_applicable("queue_timeout", f"every request started in time ({_statuses(waiting)})", how)]
    expired = [answer.seconds for answer in refused if answer.seconds >= knob / 2]
    latest = max(answer.seconds for answer in refused)
    ok = latest <= knob + TIMEOUT_SLACK_S and all(seconds >= knob - 0.01 for seconds in expired)
    on_expiry = f"{len(expired)} when their wait ran out"
    if expired:
        on_expiry += f" ({_ms(min(expired))}-{_ms(max(expired))}; {counted:.0f} counted as queue_timeout)"
    measured = (f"{len(refused)} could not start in time: {len(refused) - len(expired)} refused at arrival, "
                f"{on_expiry}; none later than {_ms(latest)}")
    return [target.check("queue_timeout", measured, ok, how)]


# --- inference_timeout --------------------------------------------------------------------------------------------


async def inference_timeout(target: Target) -> list[Check]:
    """The heaviest request the service takes: if it overruns inference_timeout, it must end then and its work
    be stopped (the model's counters)."""
    runtime = target.service.runtime
    knob = runtime.inference_timeout
    await target.afford(runtime.batch_size)
    before = target.triton_metrics()
    if target.kind == "llm":
        answers = await target.traffic.burst([target.shapes.heavy() for _ in range(runtime.batch_size)])
        after = target.triton_metrics()
        stopped = delta(after, before, "sluice_llm_requests_finished_total", model=target.name, reason="timeout")
        # The engine's clock starts when the request joins the running batch: at most batch_timeout after arrival.
        allowed = knob + runtime.batch_timeout + TIMEOUT_SLACK_S
        how = (f"{len(answers)} generations of {target.service.model.max_length - 8} tokens at once; "
               "the engine's finish reasons")
        what = "requests ended for timeout"
    else:
        answers = [await target.traffic.send(target.shapes.heavy())]
        after = target.triton_metrics()
        stopped = delta(after, before, "sluice_runs_stopped_total", model=target.name, reason="inference_timeout")
        allowed = knob + TIMEOUT_SLACK_S
        how = f"one request of {runtime.batch_size} items of {target.service.model.max_length} tokens; " \
              "the runtime's stopped-run counter"
        what = "runs stopped"
    overran = [answer for answer in answers if answer.status == 504]
    if not overran:
        longest = max(answer.seconds for answer in answers)
        if all(answer.status == 200 for answer in answers) and longest < knob:
            return [target.not_applicable(
                "inference_timeout", f"the heaviest request ran {_ms(longest)}, under the knob", how)]
        return [target.check("inference_timeout", f"no 504 ({_statuses(answers)}, longest {_ms(longest)})", False,
                             how)]
    latest = max(answer.seconds for answer in overran)
    ok = latest <= allowed and stopped >= 1
    return [target.check("inference_timeout", f"504 after {_ms(latest)}; {stopped:.0f} {what}", ok, how)]


# --- max_queue_size -----------------------------------------------------------------------------------------------


class _Queue(NamedTuple):
    """Where a service's waiting queue shows: its depth gauge, its high-water gauge (if any) and refusal counter."""

    metrics_url: str
    read: Callable[[], Metrics]
    labels: dict[str, str]
    depth: str
    peak: str | None
    refused: str
    owner: str


def _queue(target: Target) -> _Queue:
    if target.kind == "llm":  # the engine's, on Triton's metrics
        return _Queue(target.stack.triton_metrics, target.triton_metrics, {"model": target.name}, "sluice_llm_waiting",
                      "sluice_llm_waiting_peak", "sluice_llm_refused_total", "the engine")
    return _Queue(f"{target.stack.gateway}/metrics", target.gateway_metrics, {"service": target.name},
                  "sluice_gateway_queue_depth", None, "sluice_gateway_refused_total", "the gateway")


async def max_queue_size(target: Target) -> list[Check]:
    """A burst beyond the queue: the deepest queue seen must stay within the knob, the excess refused at arrival
    (never by waiting out queue_timeout), and every request answered."""
    runtime = target.service.runtime
    knob = runtime.max_queue_size
    running = runtime.batch_size * runtime.worker_count
    size = knob + running + max(4, knob // 4)
    budget = int(target.rate_budget() * 0.9)
    how = f"a burst of {size} requests"
    if size > budget:
        return [target.not_applicable(
            "max_queue_size", f"the rate limit admits {budget} at once: fewer than the queue holds",
            f"{how} would be refused by rate_limit first")]
    await target.rested()
    queue = _queue(target)
    if target.kind == "llm":
        bodies = [target.shapes.generation(max(8, target.service.model.max_length // 2)) for _ in range(size)]
    else:
        bodies = [target.shapes.light() for _ in range(size)]
    before = queue.read()
    async with Sampler(queue.metrics_url, queue.depth, queue.labels, target.stack.headers) as depth:
        answers = await target.traffic.burst(bodies)
    after = queue.read()
    peak = max(depth.peak, after.value(queue.peak, **queue.labels) if queue.peak else 0.0)
    counted_before = before.by_label(queue.refused, "reason", **queue.labels)
    reasons = {reason: count - counted_before.get(reason, 0.0)
               for reason, count in after.by_label(queue.refused, "reason", **queue.labels).items()}
    # Refused on arrival by the gateway's or engine's own count: a client's clock cannot tell, as the last of a
    # burst is read by the gateway only after all those before it.
    on_arrival = sum(count for reason, count in reasons.items() if reason != "queue_timeout")
    refusals = sorted(a.seconds for a in answers if a.status == 503)[: int(on_arrival)]
    unanswered = sum(a.status == 0 for a in answers)
    reason_text = ", ".join(f"{reason} {count:.0f}" for reason, count in reasons.items() if count)
    measured = (f"deepest queue {peak:.0f}; {on_arrival:.0f} refused on arrival, the last after "
                f"{_ms(max(refusals, default=0.0))} ({reason_text or 'no refusals'})")
    how = f"{how}, all at once ({_statuses(answers)}); {queue.owner}'s queue gauge read every 10 ms and its refusals"
    ok = peak <= knob and on_arrival > 0 and not unanswered
    return [target.check("max_queue_size", measured, ok, how)]


# --- rate_limit ---------------------------------------------------------------------------------------------------


async def rate_limit(target: Target) -> list[Check]:
    """Open-loop load at twice the limit: the rate admitted (anything but 429) once the first window has passed,
    and Retry-After on every 429."""
    limit = target.service.runtime.rate_limit
    window = target.rate_window_s()
    seconds = max(3.0, 3 * window) + window
    await target.rested()
    # A cached service gets one input over and over: the limiter is measured, not the model.
    fixed = f"rate probe {time.time_ns()}" if target.service.runtime.enable_cache else None
    answers = await target.traffic.open_loop(lambda: target.shapes.light(fixed), 2 * limit, seconds)
    start = min(answer.sent for answer in answers) + window
    counted = [answer for answer in answers if answer.sent >= start]
    admitted = sum(answer.status != 429 for answer in counted) / (seconds - window)
    refused = [answer for answer in answers if answer.status == 429]
    missing = sum(answer.retry_after is None for answer in refused)
    ok = abs(admitted - limit) <= RATE_TOLERANCE * limit and bool(refused) and missing == 0
    measured = (f"{admitted:.1f}/s admitted; {len(refused)} x 429, "
                f"{'all with Retry-After' if not missing else f'{missing} without Retry-After'}")
    how = (f"{2 * limit:g}/s offered for {seconds:g} s (open loop; {_statuses(answers)}); admitted counted after the "
           f"first {window:g} s window")
    await target.rested()  # leave the budget as found
    return [target.check("rate_limit", measured, ok, how)]


# --- total_timeout ------------------------------------------------------------------------------------------------


async def total_timeout(target: Target) -> list[Check]:
    """Every answer of every probe above, slowest first: none may come later than total_timeout."""
    knob = target.service.runtime.total_timeout
    answers = target.traffic.answers
    if not answers:
        await _lone(target)
        answers = target.traffic.answers
    slowest = max(answers, key=lambda answer: answer.seconds)
    late = sum(answer.seconds > knob + TIMEOUT_SLACK_S for answer in answers)
    measured = f"slowest answer {_ms(slowest.seconds)} ({slowest.status or 'none'}); {late} later than the knob"
    how = f"all {len(answers)} requests the other probes sent to this service (each within one batch)"
    return [target.check("total_timeout", measured, late == 0, how)]


Probe = Callable[[Target], Awaitable[list[Check]]]

# In the order they run: the ones that need an idle service first, the ones that spend the rate budget last, and
# total_timeout at the end, over everything sent before it. Each entry: the knobs a probe judges, the probe.
PROBES: tuple[tuple[tuple[str, ...], Probe], ...] = (
    (("enable_cache",), enable_cache),
    (("batch_timeout",), batch_timeout),
    (("batch_size", "worker_count"), batch_size_and_workers),
    (("queue_timeout",), queue_timeout),
    (("inference_timeout",), inference_timeout),
    (("max_queue_size",), max_queue_size),
    (("rate_limit",), rate_limit),
    (("total_timeout",), total_timeout),
)
