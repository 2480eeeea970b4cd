"""`sluice explain`: per service, each knob, its value, and where it is enforced (read back from the plan); and the
README's knob table, the same rows for each service type's defaults."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .defaults import RUNTIME_KNOBS, TYPE_DEFAULTS, resolve_runtime
from .pipeline import Compiled
from .plan import enforcement, plan_service
from .schema import Config

_UNITS = {
    "batch_timeout": "s",
    "queue_timeout": "s",
    "inference_timeout": "s",
    "total_timeout": "s",
    "rate_limit": "/s",
}


def render_explanation(compiled: Compiled, console: Console) -> None:
    for service in compiled.plan.services:
        model = service.model
        table = Table(
            title=f"{service.name}  ({model.type}: {service.model_key} = {model.model_name}, {model.device})",
            title_justify="left",
        )
        table.add_column("knob")
        table.add_column("value", justify="right")
        table.add_column("enforced by")
        table.add_column("as")
        for row in enforcement(service):
            shown = f"{row.value:g}" if isinstance(row.value, float) else str(row.value).lower()
            value = f"{shown}{_UNITS.get(row.knob, '')}"
            if not row.explicit:
                value += " [dim](default)[/dim]"
            table.add_row(row.knob, value, row.where, row.what)
        console.print(table)
    if compiled.warnings:
        console.print("[bold yellow]warnings[/bold yellow]")
        for warning in compiled.warnings:
            console.print(f"  - {warning}", highlight=False, soft_wrap=True)
    else:
        console.print("no warnings")


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
