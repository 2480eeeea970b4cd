"""The `sluice` command line: compile, explain (and, as they land, models, serve, up)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from compiler.explain import render_explanation
from compiler.pipeline import Compiled, build_plan, compile_repository
from sluice.errors import SluiceError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out_console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="config.yaml, or the seed's flat config.py")]
DEFAULT_CONFIG = Path("config.yaml")
DEFAULT_REPOSITORY = Path("model_repository")


def _print_warnings(compiled: Compiled) -> None:
    for warning in compiled.warnings:
        err_console.print(f"[yellow]warning[/yellow] {warning}", highlight=False, soft_wrap=True)


def _fail(error: SluiceError) -> typer.Exit:
    err_console.print(f"[red]error[/red] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.command("compile")
def compile_command(
    config: ConfigArg = DEFAULT_CONFIG,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository to write")] = DEFAULT_REPOSITORY,
) -> None:
    """Compile CONFIG into a Triton model repository."""
    try:
        compiled = compile_repository(config, output, progress=lambda line: err_console.print(line))
    except SluiceError as error:
        raise _fail(error) from None
    _print_warnings(compiled)
    names = ", ".join(service.name for service in compiled.plan.services)
    out_console.print(f"compiled {config} -> {output}/ ({names})", highlight=False)


@app.command("explain")
def explain_command(config: ConfigArg = DEFAULT_CONFIG) -> None:
    """Show, per service, each knob, its value, and where it is enforced."""
    try:
        compiled = build_plan(config)
    except SluiceError as error:
        raise _fail(error) from None
    render_explanation(compiled, out_console)


def main() -> None:
    app()
