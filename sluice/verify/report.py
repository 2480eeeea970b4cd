"""A verify run's findings: one ``Check`` per (service, knob), printed as a table per service and saved as JSON."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

KNOBS = (
    "rate_limit", "max_queue_size", "queue_timeout", "batch_size", "batch_timeout", "worker_count",
    "inference_timeout", "total_timeout", "enable_cache",
)


class Verdict(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"
    # The knob could not be made to act here (e.g. no request this model accepts runs long enough to overrun
    # inference_timeout): neither a pass nor a failure, and the line says why.
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class Check:
    service: str
    knob: str
    configured: Any
    measured: str
    verdict: Verdict
    how: str
    seconds: float = 0.0  # how long the probe took

    @staticmethod
    def judged(service: str, knob: str, configured: Any, measured: str, ok: bool, how: str) -> Check:
        return Check(service, knob, configured, measured, Verdict.PASS if ok else Verdict.FAIL, how)


_STYLE = {Verdict.PASS: "green", Verdict.FAIL: "bold red", Verdict.NOT_APPLICABLE: "yellow"}


def print_tables(checks: Iterable[Check], console: Console) -> None:
    """One table per service. Written to a file or pipe, the lines are not wrapped at 80 columns."""
    if not console.is_terminal:
        console = Console(file=console.file, width=200)
    by_service: dict[str, list[Check]] = {}
    for check in checks:
        by_service.setdefault(check.service, []).append(check)
    for service, rows in by_service.items():
        table = Table(title=service, title_justify="left", show_lines=False, expand=False)
        for column in ("knob", "configured", "measured", "verdict", "how it was measured"):
            table.add_column(column, overflow="fold")
        for check in rows:
            table.add_row(check.knob, _configured(check.configured), check.measured,
                          f"[{_STYLE[check.verdict]}]{check.verdict}[/]", check.how)
        console.print(table)


def summary(checks: list[Check]) -> str:
    counts = {verdict: sum(check.verdict is verdict for check in checks) for verdict in Verdict}
    failed = [f"{check.service}.{check.knob}" for check in checks if check.verdict is Verdict.FAIL]
    line = f"{counts[Verdict.PASS]} passed, {counts[Verdict.FAIL]} failed, {counts[Verdict.NOT_APPLICABLE]} n/a"
    return line + (f": {', '.join(failed)}" if failed else "")


def write_json(checks: list[Check], path: Path) -> None:
    rows = [asdict(check) | {"verdict": str(check.verdict)} for check in checks]
    path.write_text(json.dumps({"checks": rows, "summary": summary(checks)}, indent=2) + "\n", encoding="utf-8")


def write_markdown(checks: list[Check], path: Path) -> None:
    """The tables as Markdown (for a README or a report), one per service."""
    lines: list[str] = []
    for service in dict.fromkeys(check.service for check in checks):
        lines += [f"**{service}**", "", "| knob | configured | measured | verdict | how it was measured |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{c.knob}` | {_configured(c.configured)} | {_cell(c.measured)} | {c.verdict} | {_cell(c.how)} |"
                  for c in checks if c.service == service]
        lines.append("")
    lines.append(summary(checks))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _configured(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
