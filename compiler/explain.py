"""`sluice explain`: per service, each knob, its value, and where it is enforced (read back from the plan); and the
README's knob table, the same rows for each service type's defaults."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .defaults import RUNTIME_KNOBS, TYPE_DEFAULTS, resolve_runtime
from .pipeline import Compiled
from .plan import Enforcement, enforcement, plan_service
from .schema import Config

_UNITS = {
    "batch_timeout": "s",
    "queue_timeout": "s",
    "inference_timeout": "s",
    "total_timeout": "s",
    "rate_limit": "/s",
}


def render_explanation(compiled: Compiled, console: Console) -> None:
    """Each service's knobs, then the warnings: a table on a terminal, one whole line a knob elsewhere (a pipe or a
    file gets every word, never cut or wrapped to a guessed width)."""
    for service in compiled.plan.services:
        model = service.model
        title = f"{service.name}  ({model.type}: {service.model_key} = {model.model_name}, {model.device})"
        rows = enforcement(service)
        if console.is_terminal:
            console.print(_table(title, rows))
        else:
            _print_plain(console, title, rows)
    if compiled.warnings:
        console.print("[bold yellow]warnings[/bold yellow]")
        for warning in compiled.warnings:
            console.print(f"  - {warning}", highlight=False, soft_wrap=True, markup=False)
    else:
        console.print("no warnings")


def explanation_json(compiled: Compiled) -> list[dict[str, Any]]:
    """`sluice explain --json`: a list of services, each with its model and its knobs (value, explicit, where,
    what), from the same ``enforcement`` rows as the table."""
    return [
        {
            "service": service.name,
            "type": service.model.type,
            "model": service.model_key,
            "model_name": service.model.model_name,
            "device": service.model.device,
            "knobs": {
                row.knob: {"value": row.value, "explicit": row.explicit, "where": row.where, "what": row.what}
                for row in enforcement(service)
            },
        }
        for service in compiled.plan.services
    ]


def _shown(row: Enforcement) -> str:
    shown = f"{row.value:g}" if isinstance(row.value, float) else str(row.value).lower()
    return f"{shown}{_UNITS.get(row.knob, '')}"


def _table(title: str, rows: list[Enforcement]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("knob")
    table.add_column("value", justify="right")
    table.add_column("enforced by")
    table.add_column("as")
    for row in rows:
        value = _shown(row) + ("" if row.explicit else " [dim](default)[/dim]")
        table.add_row(row.knob, value, row.where, row.what)
    return table


def _print_plain(console: Console, title: str, rows: list[Enforcement]) -> None:
    console.print(title, highlight=False, soft_wrap=True, markup=False)
    console.print(f"  {'knob':<18} {'value':<16} {'enforced by':<16} as", highlight=False, soft_wrap=True)
    for row in rows:
        value = _shown(row) + ("" if row.explicit else " (default)")
        line = f"  {row.knob:<18} {value:<16} {row.where:<16} {row.what}"
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print()


def knob_table_markdown() -> str:
    """The README's "What each knob becomes" table: ``enforcement`` of one CPU service of each type, rows that
    read the same for several types merged."""
    rows: dict[tuple[str, str, str], list[str]] = {}
    for model_type in TYPE_DEFAULTS:
        config = Config.model_validate({
            "models": {"m": {"type": model_type, "model_name": "m"}},
            "services": {"s": {"model": "m"}},
        })
        for row in enforcement(plan_service("s", config, resolve_runtime(model_type, {}))):
            rows.setdefault((row.knob, row.where, row.what), []).append(model_type)
    lines = ["| knob | service types | enforced by | as |", "|---|---|---|---|"]
    for (knob, where, what), types in sorted(rows.items(), key=lambda row: RUNTIME_KNOBS.index(row[0][0])):
        lines.append(f"| `{knob}` | {', '.join(types)} | {where} | {what} |")
    return "\n".join(lines) + "\n"
