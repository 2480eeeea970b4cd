"""The `sluice` command line: compile, explain (and, as they land, models, serve, up)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from compiler.explain import render_explanation
from compiler.pipeline import Compiled, build_plan, compile_repository
from gateway.settings import GatewaySettings
from sluice.errors import SluiceError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out_console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="config.yaml, or the seed's flat config.py")]
DEFAULT_CONFIG = Path("config.yaml")
DEFAULT_REPOSITORY = Path("model_repository")


def _say(line: str) -> None:
    err_console.print(line, highlight=False, soft_wrap=True)


def cache_root() -> Path | None:
    """SLUICE_CACHE_DIR, where set: the export cache (default: .sluice/cache beside the config file)."""
    value = os.environ.get("SLUICE_CACHE_DIR")
    return Path(value) if value else None


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
        compiled = compile_repository(config, output, cache_root=cache_root(), progress=_say)
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


@app.command("models")
def models_command(
    directory: Annotated[Path, typer.Option("--dir", help="Where to put the demo models")] = Path("models"),
) -> None:
    """Materialise the demo models: the real all-MiniLM-L6-v2 and tiny random-weight test models."""
    from sluice.demo_models import materialise

    for name, path in materialise(directory).items():
        out_console.print(f"{name:<20} {path}", highlight=False)


@app.command("serve")
def serve_command(
    config: ConfigArg = DEFAULT_CONFIG,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository to serve")] = DEFAULT_REPOSITORY,
    triton_url: Annotated[
        str | None, typer.Option(help="Use this already running Triton (HTTP URL) instead of starting one")
    ] = None,
) -> None:
    """Compile CONFIG when stale, start tritonserver on it, and serve until Ctrl-C or SIGTERM."""
    from sluice.serve import running_triton, stop_on_signals, wait_forever

    try:
        with stop_on_signals(), running_triton(
            config, output, say=_say, triton_url=triton_url, cache_root=cache_root()
        ) as serving:
            for service in serving.compiled.plan.services:
                out_console.print(f"{service.name:<20} {serving.http_url}/v2/models/{service.name}", highlight=False)
            out_console.print("ready; Ctrl-C stops everything", highlight=False)
            wait_forever(serving.alive, "tritonserver")
    except KeyboardInterrupt:
        err_console.print("stopped")
    except SluiceError as error:
        raise _fail(error) from None


@app.command("gateway")
def gateway_command(
    repository: Annotated[Path, typer.Option(help="Compiled model repository (its sluice.json)")] = DEFAULT_REPOSITORY,
    triton_grpc: Annotated[str | None, typer.Option(help="Triton's gRPC address, host:port")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default: sluice.json's)")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: sluice.json's)")] = None,
) -> None:
    """Serve the REST gateway in front of an already running Triton."""
    from sluice.serve import run_gateway

    try:
        settings = GatewaySettings.from_repository(repository, triton_grpc=triton_grpc, host=host, port=port)
        _say(f"gateway http://{settings.host}:{settings.port}  ->  triton grpc {settings.triton_grpc}")
        run_gateway(settings, _say)
    except SluiceError as error:
        raise _fail(error) from None


@app.command("up")
def up_command(
    config: ConfigArg = DEFAULT_CONFIG,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository to serve")] = DEFAULT_REPOSITORY,
) -> None:
    """Compile CONFIG, start tritonserver and the gateway, and serve until Ctrl-C."""
    from sluice.serve import run_gateway, running_triton, stop_on_signals

    try:
        with stop_on_signals(), running_triton(config, output, say=_say, cache_root=cache_root()) as serving:
            assert serving.grpc_url is not None
            settings = GatewaySettings.from_repository(output, triton_grpc=serving.grpc_url)
            _print_endpoints(settings)
            run_gateway(settings, _say)
    except KeyboardInterrupt:
        err_console.print("stopped")
    except SluiceError as error:
        raise _fail(error) from None


def _print_endpoints(settings: GatewaySettings) -> None:
    base = f"http://{settings.host}:{settings.port}"
    by_type = {route.type: route.service for route in settings.routes.values()}
    lines = [f"gateway {base}/v1  (GET /v1/models, /health, /ready, /metrics); Ctrl-C stops everything"]
    if "embedding" in by_type:
        lines.append(f"  curl -s {base}/v1/embeddings -H 'content-type: application/json' "
                     f"-d '{{\"model\": \"{by_type['embedding']}\", \"input\": [\"hello world\"]}}'")
    if "reranker" in by_type:
        lines.append(f"  curl -s {base}/v1/rerank -H 'content-type: application/json' "
                     f"-d '{{\"model\": \"{by_type['reranker']}\", \"query\": \"what do cats eat\", "
                     f"\"documents\": [\"stocks fell\", \"cats eat fish\"]}}'")
    if "llm" in by_type:
        lines.append(f"  curl -sN {base}/v1/chat/completions -H 'content-type: application/json' "
                     f"-d '{{\"model\": \"{by_type['llm']}\", \"stream\": true, "
                     f"\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'")
    for line in lines:
        out_console.print(line, highlight=False, soft_wrap=True)


def main() -> None:
    app()
