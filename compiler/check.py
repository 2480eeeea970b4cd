"""Stage 3: checks that span fields: references, timeout arithmetic, and advice on doubtful strategies.

Errors stop the compile; warnings are printed and the compile goes on.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sluice.errors import ConfigIssue

from .defaults import ResolvedRuntime
from .schema import Config


@dataclass(frozen=True)
class Findings:
    errors: list[ConfigIssue]
    warnings: list[ConfigIssue]


def check_references(data: Any) -> list[ConfigIssue]:
    """Unknown model references, checked on raw data so they are reported beside schema errors."""
    if not isinstance(data, Mapping):
        return []
    models, services = data.get("models"), data.get("services")
    if not isinstance(models, Mapping) or not isinstance(services, Mapping):
        return []
    issues = []
    for name, service in services.items():
        ref = service.get("model") if isinstance(service, Mapping) else None
        if isinstance(ref, str) and ref not in models:
            known = ", ".join(sorted(map(str, models))) or "none defined"
            issues.append(ConfigIssue(f"services.{name}.model", f"unknown model {ref!r}; models: {known}"))
    return issues


def check(config: Config, runtimes: Mapping[str, ResolvedRuntime], cpu_count: int | None = None) -> Findings:
    """Cross-field errors and strategy warnings for a schema-valid config with resolved runtimes."""
    cores = cpu_count or os.cpu_count() or 1
    errors: list[ConfigIssue] = []
    warnings: list[ConfigIssue] = []
    for name, runtime in runtimes.items():
        at = f"services.{name}.runtime"
        errors += _timeout_errors(at, runtime)
        served = config.models[config.services[name].model]
        warnings += _strategy_warnings(at, runtime, llm=served.type == "llm")
        if served.type != "llm":
            warnings += _big_request_warnings(at, runtime, config.gateway.max_items)
        device = served.device
        if device == "cpu" and runtime.worker_count > cores:
            warnings.append(ConfigIssue(
                f"{at}.worker_count",
                f"{runtime.worker_count} workers on a CPU service but this machine has {cores} cores: "
                "instances will compete for the same cores",
            ))
    errors += _address_errors(config)
    used = {service.model for service in config.services.values()}
    for model in sorted(set(config.models) - used):
        warnings.append(ConfigIssue(f"models.{model}", "defined but no service uses it"))
    return Findings(errors, warnings)


def _timeout_errors(at: str, r: ResolvedRuntime) -> list[ConfigIssue]:
    errors = []
    if r.batch_timeout >= r.queue_timeout:
        errors.append(ConfigIssue(
            f"{at}.batch_timeout",
            f"{r.batch_timeout}s must be below queue_timeout ({r.queue_timeout}s): a request would expire "
            "in the queue while the batcher still waits for company",
        ))
    if r.queue_timeout + r.inference_timeout > r.total_timeout:
        errors.append(ConfigIssue(
            f"{at}.total_timeout",
            f"{r.total_timeout}s is less than queue_timeout + inference_timeout "
            f"({r.queue_timeout}s + {r.inference_timeout}s): a request could be admitted that cannot finish",
        ))
    return errors


def _strategy_warnings(at: str, r: ResolvedRuntime, *, llm: bool) -> list[ConfigIssue]:
    warnings = []
    # Little's law: the rate limiter admits rate_limit req/s and each lives at most total_timeout seconds,
    # so no more than rate_limit * total_timeout can be queued or running at once.
    alive = r.rate_limit * r.total_timeout
    if r.max_queue_size > alive:
        warnings.append(ConfigIssue(
            f"{at}.max_queue_size",
            f"{r.max_queue_size} can never bind: rate_limit * total_timeout = {r.rate_limit:g} * "
            f"{r.total_timeout:g} = {alive:g} requests at most are alive at once (one gateway replica)",
        ))
    if r.batch_size > r.max_queue_size:
        # The LLM's engine admits waiting requests into its running batch at every decode step, so its batch can
        # still fill; only the first batch after an idle spell is capped by the queue.
        consequence = (
            f"an idle engine starts at most {r.max_queue_size} requests together (more join at later decode steps)"
            if llm else "full batches can never form"
        )
        warnings.append(ConfigIssue(
            f"{at}.batch_size",
            f"{r.batch_size} is larger than max_queue_size ({r.max_queue_size}): {consequence}",
        ))
    return warnings


def _big_request_warnings(at: str, r: ResolvedRuntime, max_items: int) -> list[ConfigIssue]:
    """An embedding or rerank request of n items is ceil(n / batch_size) chunks: each waits in the queue, has its
    own total_timeout and counts once toward rate_limit. Warn when the largest request the gateway accepts
    (gateway.max_items) can never be admitted."""
    chunks = math.ceil(max_items / r.batch_size)
    warnings = []
    if chunks > r.max_queue_size:
        warnings.append(ConfigIssue(
            f"{at}.max_queue_size",
            f"{r.max_queue_size} is below the {chunks} chunks of a request of gateway.max_items = {max_items} items "
            f"(batch_size {r.batch_size}): such a request is always refused (503)",
        ))
    if chunks > r.rate_limit:
        warnings.append(ConfigIssue(
            f"{at}.rate_limit",
            f"{r.rate_limit:g}/s is below the {chunks} requests a request of gateway.max_items = {max_items} items "
            f"counts as (batch_size {r.batch_size}): such a request may never fit the budget (413)",
        ))
    return warnings


def _address_errors(config: Config) -> list[ConfigIssue]:
    errors = []
    ports = {
        "server.http_port": (config.server.host, config.server.http_port),
        "server.grpc_port": (config.server.host, config.server.grpc_port),
        "server.metrics_port": (config.server.host, config.server.metrics_port),
        "gateway.port": (config.gateway.host, config.gateway.port),
    }
    seen: dict[int, str] = {}
    for path, (_, port) in ports.items():
        if port in seen:
            errors.append(ConfigIssue(path, f"port {port} is already used by {seen[port]}"))
        seen.setdefault(port, path)
    if not config.gateway.api_keys and not is_loopback(config.gateway.host):
        errors.append(ConfigIssue(
            "gateway.host",
            f"refusing to listen on {config.gateway.host!r} without gateway.api_keys; "
            "set api_keys or bind 127.0.0.1",
        ))
    return errors


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
