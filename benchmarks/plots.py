"""The PNG plots of `sluice bench`, drawn from one service's figures (the ``services`` entries of bench.json).

Figures are built with matplotlib's object API (no pyplot: no global state, no display); PNGs are rendered by Agg.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

Result = dict[str, Any]  # one service's entry of bench.json


def service_plots(result: Result, out: Path) -> list[Path]:
    """Writes ``<service>-throughput.png``, ``-latency.png``, ``-batches.png`` and, for the LLM, ``-ttft.png`` into
    ``out``; returns their paths."""
    name = result["service"]
    drawn = [
        _two_panels(result, out / f"{name}-throughput.png", f"{name}: throughput and goodput", _throughput),
        _two_panels(result, out / f"{name}-latency.png", f"{name}: latency of answered requests"
                    + (" (whole stream)" if result["type"] == "llm" else ""), _latency),
        _batches(result, out / f"{name}-batches.png"),
    ]
    if result["type"] == "llm":
        drawn.append(_two_panels(result, out / f"{name}-ttft.png", f"{name}: time to first token", _ttft))
    return drawn


def _two_panels(result: Result, path: Path, title: str, draw: Callable[[Axes, list[Result], str], None]) -> Path:
    """Closed loop on the left (x: concurrency), open loop on the right (x: offered requests per second)."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    closed_axes, open_axes = figure.subplots(1, 2)
    draw(closed_axes, result["closed"], "concurrency")
    closed_axes.set_xscale("log", base=2)  # concurrency grows geometrically: 1, 4, 16
    concurrency = _xs(result["closed"], "concurrency")
    closed_axes.set_xticks(concurrency, [f"{x:g}" for x in concurrency])
    closed_axes.set_xlabel("concurrent clients (closed loop)")
    draw(open_axes, result["open"], "offered_per_s")
    open_axes.set_xlabel(f"offered load, requests/s (open loop; capacity {result['capacity_per_s']:g}/s)")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    return path


def _xs(steps: list[Result], key: str) -> list[float]:
    return [float(step[key]) for step in steps]


def _throughput(axes: Axes, steps: list[Result], x: str) -> None:
    xs = _xs(steps, x)
    axes.plot(xs, _xs(steps, "throughput_per_s"), "o-", label="throughput (2xx/s)")
    axes.plot(xs, _xs(steps, "goodput_per_s"), "s--", label="goodput (2xx within total_timeout /s)")
    if x == "offered_per_s" and xs:
        axes.plot([0, max(xs)], [0, max(xs)], ":", color="grey", label="offered")
    axes.set_ylabel("requests/s")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _percentiles(axes: Axes, steps: list[Result], x: str, key: str, quantiles: tuple[str, ...]) -> None:
    for quantile, marker in zip(quantiles, "o^sv", strict=False):
        points = [(float(step[x]), step[key][quantile]) for step in steps if step[key][quantile] is not None]
        axes.plot([p[0] for p in points], [p[1] for p in points], f"{marker}-", label=quantile)
    axes.set_ylabel("ms")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _latency(axes: Axes, steps: list[Result], x: str) -> None:
    _percentiles(axes, steps, x, "latency_ms", ("p50", "p90", "p99"))


def _ttft(axes: Axes, steps: list[Result], x: str) -> None:
    _percentiles(axes, steps, x, "ttft_ms", ("p50", "p99"))


def _batches(result: Result, path: Path) -> Path:
    batches = result["batches"]
    histogram = {int(size): count for size, count in batches["histogram"].items()}
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.subplots()
    axes.bar(list(histogram), list(histogram.values()), width=0.8)
    axes.set_xlabel(f"batch size (batch_size {result['knobs']['batch_size']})")
    axes.set_ylabel(batches["unit"])
    axes.set_xlim(0.4, result["knobs"]["batch_size"] + 0.6)
    axes.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{result['service']}: {batches['source']}", fontsize="medium")
    figure.savefig(path, dpi=100)
    return path
