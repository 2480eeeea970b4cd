"""The Grafana dashboard (deploy/monitoring/) cannot rot: its files are what build_dashboard.py writes, the k8s
ConfigMap holds the same JSON, and every panel's query returns data from a real Prometheus (Debian's
/usr/bin/prometheus) scraping a real tritonserver and gateway under a little load."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from gateway.settings import GatewaySettings
from sluice.triton_server import TritonServer, free_ports
from tests.gateway_server import GatewayServer
from tests.helpers import compiled_triton

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
SERVICES = ("embedding_service", "reranker_service", "llm_service")
# What Grafana puts in place of its variables: every service, and a rate window spanning the whole test.
VARIABLES = {"$service": "(" + "|".join(SERVICES) + ")", "$__rate_interval": "1m", "$__range": "1m",
             "$__interval": "1s"}
SCRAPE_S = 1.0


def build_dashboard() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", MONITORING / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def committed_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MONITORING / "dashboards" / "sluice.json").read_text(encoding="utf-8"))
    return data


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, query) for every target of every panel."""
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in dashboard["panels"] if panel["type"] != "row" for target in panel["targets"]]


# --- the files ----------------------------------------------------------------------------------------------------


def test_committed_dashboard_and_configmap_are_what_the_script_writes_when_generated() -> None:
    script = build_dashboard()
    assert (MONITORING / "dashboards" / "sluice.json").read_text(encoding="utf-8") == script.dashboard_text(), (
        "run: python deploy/monitoring/build_dashboard.py")
    assert script.CONFIGMAP_PATH.read_text(encoding="utf-8") == script.configmap_text(), (
        "run: python deploy/monitoring/build_dashboard.py")


def test_k8s_configmap_holds_the_dashboard_json_for_grafanas_sidecar_when_applied() -> None:
    (configmap,) = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "monitoring" / "grafana-dashboard.yaml").read_text())
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["sluice.json"]) == committed_dashboard()


def test_dashboard_panels_filter_on_the_service_variable_when_queried() -> None:
    dashboard = committed_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["service"]["multi"] and variables["service"]["includeAll"]
    titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles))
    for where, expr in panel_targets(dashboard):
        assert '=~"$service"' in expr, f"{where} does not filter on $service: {expr}"


def test_compose_prometheus_scrapes_triton_and_gateway_when_configured() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for static in job["static_configs"] for t in static["targets"]}
    assert targets == {"triton:8002", "gateway:8080"}
    assert PROMTOOL is not None, "promtool is not installed: apt-get install -y prometheus (.ci/run does)"
    result = subprocess.run([PROMTOOL, "check", "config", str(MONITORING / "prometheus.yml")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- every query against a real Prometheus ------------------------------------------------------------------------


def stack_config(models: dict[str, Path]) -> dict[str, Any]:
    fast = {"worker_count": 1, "batch_timeout": 0.001, "inference_timeout": 5.0, "total_timeout": 8.0}
    return {
        "models": {
            "minilm": {"type": "embedding", "model_name": str(models["all-MiniLM-L6-v2"])},
            "cross_encoder": {"type": "reranker", "model_name": str(models["tiny-cross-encoder"])},
            "tiny_llm": {"type": "llm", "model_name": str(models["tiny-llm"]), "max_length": 256},
        },
        "services": {
            # One call at a time and one chunk waiting: a burst of requests is refused (queue_full).
            "embedding_service": {"model": "minilm", "runtime": {
                **fast, "batch_size": 4, "max_queue_size": 1, "queue_timeout": 2.0, "enable_cache": True,
                "rate_limit": 1000}},
            # Two requests a second: the third in a burst is rate limited (429).
            "reranker_service": {"model": "cross_encoder", "runtime": {
                **fast, "queue_timeout": 2.0, "rate_limit": 2}},
            "llm_service": {"model": "tiny_llm", "runtime": {**fast, "queue_timeout": 2.0, "rate_limit": 1000}},
        },
    }


class Prometheus:
    """/usr/bin/prometheus on a free loopback port, scraping ``targets`` (job -> (host:port, metrics path)) every
    second, its storage in ``root``."""

    def __init__(self, root: Path, targets: dict[str, tuple[str, str]]) -> None:
        assert PROMETHEUS is not None
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "metrics_path": path, "static_configs": [{"targets": [address]}]}
                               for job, (address, path) in targets.items()],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        (port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self.args = [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        self.log = root / "prometheus.log"

    def __enter__(self) -> Prometheus:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"prometheus did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scraped_up(self) -> bool:
        return {s["metric"]["job"]: s["value"][1] for s in self.query("up")} == {"triton": "1", "gateway": "1"}


@pytest.fixture(scope="module")
def scraped_stack(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path], export_cache: Path
) -> Iterator[tuple[Prometheus, str]]:
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed: apt-get install -y prometheus (.ci/run does)")
    root = tmp_path_factory.mktemp("dashboard")
    with compiled_triton(root, stack_config(demo_models), export_cache) as (triton, repository):
        settings = GatewaySettings.from_repository(repository, triton_grpc=triton.grpc_url, environ={})
        with GatewayServer(settings) as gateway:
            targets = {"triton": (address(triton), "/metrics"), "gateway": (gateway.url.split("//")[1], "/metrics")}
            with Prometheus(root, targets) as prometheus:
                yield prometheus, gateway.url


def address(triton: TritonServer) -> str:
    return triton.metrics_url.split("//")[1].split("/")[0]


def wait_for(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def send_load(url: str, wave: int) -> list[int]:
    """Embeddings (repeated: cache hits; a concurrent burst: queue_full), reranks (a burst past rate_limit: 429),
    and LLM streams; the statuses answered."""
    statuses: list[int] = []
    lock = threading.Lock()

    def post(path: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            if body.get("stream"):
                with http.stream("POST", path, json=body) as response:
                    response.read()
            else:
                response = http.post(path, json=body)
        with lock:
            statuses.append(response.status_code)

    def burst(path: str, bodies: list[dict[str, Any]]) -> None:
        threads = [threading.Thread(target=post, args=(path, body)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    texts = ["the quick brown fox", "hello world", "streaming tokens"]
    for _ in range(3):
        post("/v1/embeddings", {"model": "embedding_service", "input": texts})
    burst("/v1/embeddings", [{"model": "embedding_service", "input": [f"text {wave} {i} {j}" for j in range(4)]}
                             for i in range(16)])
    burst("/v1/rerank", [{"model": "reranker_service", "query": "fox", "documents": texts}] * 5)
    burst("/v1/completions", [{"model": "llm_service", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                               "stream": True} for prompt in ("the quick brown fox", "hello", "fun", "a café")])
    return statuses


@pytest.mark.integration
def test_every_panel_query_returns_data_when_prometheus_scrapes_a_stack_under_load(
    scraped_stack: tuple[Prometheus, str],
) -> None:
    prometheus, url = scraped_stack
    wait_for(prometheus.scraped_up, "Prometheus to scrape Triton and the gateway")
    # Two waves a few scrapes apart: a series born in the first has samples before the second moves it.
    first = send_load(url, 1)
    time.sleep(3 * SCRAPE_S)
    second = send_load(url, 2)
    assert {200, 429, 503} <= set(first + second), sorted(set(first + second))
    wait_for(lambda: prometheus.query('sum(sluice_gateway_requests_total{status="429"})'), "the 429s to be scraped")
    time.sleep(3 * SCRAPE_S)

    empty, no_number = [], []
    for where, expr in panel_targets(committed_dashboard()):
        for variable, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable the test does not substitute: {expr}"
        result = prometheus.query(expr)
        if not result:
            empty.append(f"{where}: {expr}")
        elif all(math.isnan(float(sample["value"][1])) for sample in result):
            no_number.append(f"{where}: {expr}")
    assert empty == [], "panels with no data:\n" + "\n".join(empty)
    assert no_number == [], "panels with only NaN:\n" + "\n".join(no_number)
