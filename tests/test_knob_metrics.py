"""``sluice_gateway_knob``: each service's compiled knobs as gauges, so a dashboard can draw a limit (max_queue_size,
rate_limit) beside the series it bounds."""

from __future__ import annotations

from prometheus_client import generate_latest

from compiler.defaults import RUNTIME_KNOBS
from gateway.metrics import GatewayMetrics
from tests.gateway_fakes import route
from tests.helpers import sample_value


def exported() -> str:
    metrics = GatewayMetrics([
        route("emb", "embedding", batch_size=32, max_queue_size=7, instances=3, queue_timeout=0.25,
              inference_timeout=0.5, total_timeout=0.75, rate_limit=12.5, enable_cache=True, batch_timeout=0.002),
        route("llm", "llm", enable_cache=False),
    ])
    return generate_latest(metrics.registry).decode()


def test_knob_gauge_exports_each_route_setting_in_config_units_when_app_starts() -> None:
    text = exported()
    knob = {name: sample_value(text, "sluice_gateway_knob", service="emb", knob=name) for name in (
        "batch_size", "batch_timeout", "max_queue_size", "instances", "queue_timeout", "inference_timeout",
        "total_timeout", "rate_limit", "enable_cache")}
    assert knob == {"batch_size": 32, "batch_timeout": 0.002, "max_queue_size": 7, "instances": 3,
                    "queue_timeout": 0.25, "inference_timeout": 0.5, "total_timeout": 0.75, "rate_limit": 12.5,
                    "enable_cache": 1}
    assert 'sluice_gateway_knob{knob="enable_cache",service="llm"} 0.0' in text


def test_knob_labels_are_config_yaml_knob_names_when_exported() -> None:
    names = {line.split('knob="')[1].split('"')[0] for line in exported().splitlines()
             if line.startswith("sluice_gateway_knob{")}
    # worker_count reaches the manifest as instances (worker_count x GPUs): the one knob under another name.
    assert names == (set(RUNTIME_KNOBS) - {"worker_count"}) | {"instances"}
