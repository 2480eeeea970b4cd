"""`sluice explain`: per service, each knob, its value, and where it is enforced (read back from the plan)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .pipeline import Compiled
from .plan import enforcement

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
