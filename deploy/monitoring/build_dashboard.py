"""Writes Sluice's Grafana dashboard: deploy/monitoring/dashboards/sluice.json (Grafana's file provisioning, for
docker compose) and deploy/k8s/monitoring/grafana-dashboard.yaml (the same JSON in a ConfigMap for Grafana's
dashboard sidecar). Edit the panels here and run ``python deploy/monitoring/build_dashboard.py``; tests check that
both files are what this script writes (tests/test_dashboard.py) and run every query against a real Prometheus.

Queries use two dashboard variables: ``$service`` (the services the gateways export, a regex; Triton and the LLM
engine label the same name ``model``) and ``$datasource``; and Grafana's ``$__rate_interval``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD_PATH = HERE / "dashboards" / "sluice.json"
CONFIGMAP_PATH = HERE.parent / "k8s" / "monitoring" / "grafana-dashboard.yaml"
DASHBOARD_UID = "sluice-services"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

GW = 'service=~"$service"'  # the gateway's label
TRITON = 'model=~"$service"'  # Triton's and the LLM engine's label for the same service
RATE = "[$__rate_interval]"


def rate(metric: str, labels: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{labels}}}{RATE}))"


def quantile(q: float, metric: str, labels: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{labels}}}{RATE})))"


HITS = rate("sluice_gateway_cache_hits_total", GW, "service")
MISSES = rate("sluice_gateway_cache_misses_total", GW, "service")


def knob(name: str) -> str:
    return f'max by (service) (sluice_gateway_knob{{{GW},knob="{name}"}})'


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    limits: tuple[str, ...] = ()  # legends drawn as dashed limit lines
    width: int = 12
    options: dict[str, Any] = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic", [
        Panel("Requests by status", "Answered requests per second at the gateways, by HTTP status.", [
            (rate("sluice_gateway_requests_total", GW, "service, status"), "{{service}} {{status}}"),
        ], unit="reqps"),
        Panel("Request latency", "Arrival to last byte at the gateway, p50 and p99.", [
            (quantile(0.5, "sluice_gateway_request_seconds", GW, "service"), "{{service}} p50"),
            (quantile(0.99, "sluice_gateway_request_seconds", GW, "service"), "{{service}} p99"),
        ], unit="s"),
        Panel("Rate limited, against rate_limit",
              "Requests per second refused (429) by the service's or an API key's rate limit; admitted requests "
              "beside the service's rate_limit (requests/s; a request of n items counts ceil(n / batch_size)).", [
                  (rate("sluice_gateway_rate_limited_total", GW, "service, scope"), "{{service}} refused ({{scope}})"),
                  (rate("sluice_gateway_requests_total", GW + ',status!="429"', "service"), "{{service}} admitted"),
                  (knob("rate_limit"), "{{service}} rate_limit"),
              ], unit="reqps", limits=("rate_limit",)),
        Panel("Cache hit ratio",
              "Items answered from the gateway's cache over items looked up (services with enable_cache).", [
                  (f"{HITS} / ({HITS} + {MISSES})", "{{service}}"),
              ], unit="percentunit"),
    ]),
    ("Queues and batches", [
        Panel("In flight, against max_queue_size",
              "Requests admitted and not yet answered (all gateways), chunks waiting in the gateways' queues "
              "(encoders), requests waiting in the LLM engine, and max_queue_size (per gateway for encoders, per "
              "engine for the LLM).", [
                  ("sum by (service) (sluice_gateway_in_flight{" + GW + "})", "{{service}} in flight"),
                  ("sum by (service) (sluice_gateway_queue_depth{" + GW + "})", "{{service}} waiting (gateway)"),
                  ("sum by (model) (sluice_llm_waiting{" + TRITON + "})", "{{model}} waiting (engine)"),
                  (knob("max_queue_size"), "{{service}} max_queue_size"),
              ], limits=("max_queue_size",)),
        Panel("Queue time",
              "Mean time a request waited in Triton's own queue; p99 of the LLM engine's wait from arrival to "
              "joining the running batch. An encoder's requests wait in the gateway instead: see its queue in "
              "'In flight' and the time in 'Request latency'.", [
                  (f"{rate('nv_inference_queue_duration_us', TRITON, 'model')} / 1e6 / clamp_min("
                   f"{rate('nv_inference_request_success', TRITON, 'model')}, 1e-9)", "{{model}} Triton mean"),
                  (quantile(0.99, "sluice_llm_queue_wait_seconds", TRITON, "model"), "{{model}} engine p99"),
              ], unit="s"),
        Panel("Batch sizes",
              "Gateway requests merged into each Triton call (encoders), rows per Triton execution, sequences in "
              "the LLM's running batch, and batch_size.", [
                  (f"{rate('sluice_gateway_triton_call_requests_sum', GW, 'service')} / "
                   f"{rate('sluice_gateway_triton_call_requests_count', GW, 'service')}", "{{service}} requests/call"),
                  (f"{rate('nv_inference_count', TRITON, 'model')} / "
                   f"{rate('nv_inference_exec_count', TRITON, 'model')}", "{{model}} rows/execution"),
                  ("sum by (model) (sluice_llm_running{" + TRITON + "})", "{{model}} running (engine)"),
                  (knob("batch_size"), "{{service}} batch_size"),
              ], limits=("batch_size",)),
        Panel("Refusals by reason",
              "Requests refused before any work: by the gateway's queue (queue_full, too_late, queue_timeout), by "
              "the LLM engine's queue, and requests past their inference or total timeout.", [
                  (rate("sluice_gateway_refused_total", GW, "service, reason"), "{{service}} gateway {{reason}}"),
                  (rate("sluice_llm_refused_total", TRITON, "model, reason"), "{{model}} engine {{reason}}"),
                  (rate("sluice_gateway_deadline_exceeded_total", GW, "service"), "{{service}} deadline exceeded"),
              ], unit="reqps"),
    ]),
    ("LLM", [
        Panel("Time to first token", "Arrival at the gateway to the first token (p50, p99); the engine's own "
              "(arrival at the engine), p99.", [
                  (quantile(0.5, "sluice_gateway_llm_time_to_first_token_seconds", GW, "service"), "{{service}} p50"),
                  (quantile(0.99, "sluice_gateway_llm_time_to_first_token_seconds", GW, "service"), "{{service}} p99"),
                  (quantile(0.99, "sluice_llm_time_to_first_token_seconds", TRITON, "model"), "{{model}} engine p99"),
              ], unit="s", width=8),
        Panel("Tokens per second", "Tokens generated and prompt tokens read per second, all streams together; "
              "one stream's speed (1 / median time per output token).", [
                  (rate("sluice_gateway_llm_completion_tokens_total", GW, "service"), "{{service}} generated"),
                  (rate("sluice_gateway_llm_prompt_tokens_total", GW, "service"), "{{service}} prompt"),
                  (f"1 / {quantile(0.5, 'sluice_llm_time_per_output_token_seconds', TRITON, 'model')}",
                   "{{model}} per stream (p50)"),
              ], width=8),
        Panel("Finish reasons", "LLM requests ended per second, by finish reason.", [
            (rate("sluice_llm_requests_finished_total", TRITON, "model, reason"), "{{model}} {{reason}}"),
        ], unit="reqps", width=8),
    ]),
    ("Configuration", [
        Panel("Knobs", "Each service's compiled runtime knobs (config.yaml's names; seconds, requests/s).", [
            ("max by (service, knob) (sluice_gateway_knob{" + GW + "})", ""),
        ], kind="table", width=24, options={"showHeader": True}),
    ]),
]


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for index, (expr, legend) in enumerate(panel.targets):
        target: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto",
                                  "refId": chr(ord("A") + index)}
        if panel.kind == "table":
            target |= {"format": "table", "instant": True, "range": False}
        targets.append(target)
    overrides = [
        {"matcher": {"id": "byRegexp", "options": f".* {limit}$"},
         "properties": [{"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
                        {"id": "custom.fillOpacity", "value": 0}]}
        for limit in panel.limits
    ]
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": overrides},
        "options": panel.options or {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                     "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets,
    }
    if panel.kind == "table":
        result["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    return result


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS:
        panels.append({"id": len(panels) + 1, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        x = 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, len(panels) + 1, x, y))
            x += panel.width
        y += 8
    return {
        "uid": DASHBOARD_UID,
        "title": "Sluice services",
        "description": "Per service: traffic, limits, queues, batches, refusals and LLM streaming (generated by "
                       "deploy/monitoring/build_dashboard.py)",
        "tags": ["sluice"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "version": 1,
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "service", "label": "Service", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(sluice_gateway_knob, service)", "refId": "services"},
             "definition": "label_values(sluice_gateway_knob, service)", "refresh": 2, "sort": 1,
             "multi": True, "includeAll": True, "current": {"text": "All", "value": "$__all"}, "hide": 0},
        ]},
        "panels": panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def configmap_text() -> str:
    """The ConfigMap for Grafana's dashboard sidecar (the grafana Helm chart's ``sidecar.dashboards``, which
    loads every ConfigMap labelled ``grafana_dashboard: "1"``)."""
    body = "".join(f"    {line}\n" if line else "\n" for line in dashboard_text().splitlines())
    return (
        "# Generated by deploy/monitoring/build_dashboard.py from the same panels as\n"
        "# deploy/monitoring/dashboards/sluice.json: edit the script, not this file.\n"
        "# Grafana's dashboard sidecar (grafana Helm chart, sidecar.dashboards.enabled) loads every ConfigMap\n"
        '# labelled grafana_dashboard: "1" in its namespace (or all: sidecar.dashboards.searchNamespace: ALL).\n'
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: sluice-grafana-dashboard\n"
        "  namespace: monitoring\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "    app.kubernetes.io/part-of: sluice\n"
        "data:\n"
        "  sluice.json: |\n"
        f"{body}"
    )


def main() -> int:
    DASHBOARD_PATH.write_text(dashboard_text(), encoding="utf-8")
    CONFIGMAP_PATH.write_text(configmap_text(), encoding="utf-8")
    print(f"wrote {DASHBOARD_PATH} and {CONFIGMAP_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
