"""The deployment files (docker-compose.yml, deploy/), checked statically: no Docker engine or cluster here.

Each test parses the files and asserts one piece of wiring that, if wrong, would only show on the GPU host.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from compiler.schema import Gateway, Server
from gateway.app import OPEN_PATHS
from gateway.settings import GatewaySettings
from gateway.triton import Triton
from sluice.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
TRITON_DOCKERFILE = ROOT / "deploy" / "triton.Dockerfile"
GATEWAY_DOCKERFILE = ROOT / "deploy" / "gateway.Dockerfile"
K8S = ROOT / "deploy" / "k8s"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
REDIS_PORT = 6379
# The Kubernetes release whose API schemas the manifests are checked against (autoscaling/v2 is GA since 1.23).
KUBERNETES_VERSION = "1.30"


# --- helpers ---------------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    return services[name]


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in an argument list; None when absent."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and backslash continuations joined."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    pairs = []
    for line in logical:
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def pip_pins(text: str) -> dict[str, str]:
    return {name.lower(): version for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"',]*)", text)}


def bytes_of(size: str | int) -> int:
    if isinstance(size, int):
        return size
    number, unit = re.fullmatch(r"(\d+)\s*([a-z]*)", size.strip().lower()).groups()  # type: ignore[union-attr]
    scale = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}[unit]
    return int(number) * scale


def short_volume(spec: str) -> tuple[str, str, str]:
    source, target, *mode = spec.split(":")
    return source, target, mode[0] if mode else "rw"


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in k8s_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = k8s(kind, name)
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    return containers[0]


def selected_deployments(svc: dict[str, Any]) -> list[dict[str, Any]]:
    selector = svc["spec"]["selector"]
    return [d for d in k8s("Deployment") if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]


def service_target(svc: dict[str, Any], port: int) -> int:
    """The container port a Service port lands on, resolving a named targetPort through the selected pods."""
    (spec,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    target = spec.get("targetPort", port)
    if isinstance(target, int):
        return target
    (deployment,) = selected_deployments(svc)
    (named,) = [p for p in container(deployment)["ports"] if p.get("name") == target]
    return int(named["containerPort"])


def env_var(cont: dict[str, Any], name: str) -> dict[str, Any]:
    (var,) = [v for v in cont.get("env", []) if v["name"] == name]
    return var


def compose_cli() -> list[str] | None:
    """`docker compose` when the plugin is installed, else a standalone `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


# --- Dockerfiles -----------------------------------------------------------------------------------------------


def test_triton_dockerfile_starts_from_tritonserver_24_10_when_parsed() -> None:
    bases = [args.split()[0] for keyword, args in dockerfile_instructions(TRITON_DOCKERFILE) if keyword == "FROM"]
    assert bases == [TRITON_IMAGE]


def test_triton_dockerfile_pins_each_runtime_package_when_installing() -> None:
    runs = " ".join(args for keyword, args in dockerfile_instructions(TRITON_DOCKERFILE) if keyword == "RUN")
    pins = pip_pins(runs)
    assert {"onnxruntime-gpu", "tokenizers", "transformers", "torch", "numpy"} <= pins.keys()
    # Triton 2.51's Python backend does not support numpy 2.
    assert int(pins["numpy"].split(".")[0]) < 2
    # The CPU onnxruntime would shadow onnxruntime-gpu's CUDA provider in the same site-packages.
    assert "onnxruntime" not in pins


def test_triton_dockerfile_bakes_no_model_repository_when_built() -> None:
    keywords = {keyword for keyword, _ in dockerfile_instructions(TRITON_DOCKERFILE)}
    assert not keywords & {"COPY", "ADD"}


def test_gateway_dockerfile_installs_project_as_non_root_when_built() -> None:
    instructions = dockerfile_instructions(GATEWAY_DOCKERFILE)
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert bases and bases[-1].startswith("python:3.11-slim")
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any(re.search(r"pip install (\S+ )*\.(\s|$)", run) for run in runs)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0"}
    (entrypoint,) = [yaml.safe_load(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ["sluice", "gateway"]


def test_gateway_dockerfile_pins_torch_like_pyproject_when_installing_cpu_wheel() -> None:
    project_pin = pip_pins((ROOT / "pyproject.toml").read_text())["torch"]
    runs = " ".join(args for keyword, args in dockerfile_instructions(GATEWAY_DOCKERFILE) if keyword == "RUN")
    assert pip_pins(runs)["torch"] == project_pin
    assert "download.pytorch.org/whl/cpu" in runs


# --- docker-compose.yml ----------------------------------------------------------------------------------------


def test_compose_triton_mounts_repository_read_only_when_at_model_repository_path() -> None:
    triton = service("triton")
    mounts = [short_volume(v) for v in triton["volumes"]]
    target = flag(triton["command"], "--model-repository")
    assert ("./model_repository", target, "ro") in mounts
    assert flag(triton["command"], "--model-control-mode") == "none"


def test_compose_triton_reserves_nvidia_gpu_when_deployed() -> None:
    devices = service("triton")["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_triton_has_room_for_python_backend_when_shm_size_set() -> None:
    assert bytes_of(service("triton")["shm_size"]) >= 2**30


def test_compose_triton_cache_and_ports_match_compiler_defaults_when_started() -> None:
    command = service("triton")["command"]
    assert flag(command, "--cache-config") == f"local,size={Server().response_cache_bytes}"
    # No port flags: Triton's defaults, which are also the compiler's.
    assert not {"--http-port", "--grpc-port", "--metrics-port"} & {a.split("=")[0] for a in command}
    assert (Server().http_port, Server().grpc_port, Server().metrics_port) == (8000, 8001, 8002)


def test_compose_triton_healthcheck_probes_readiness_when_defined() -> None:
    test = service("triton")["healthcheck"]["test"]
    assert "/v2/health/ready" in " ".join(test if isinstance(test, list) else [test])


def test_compose_gateway_reaches_triton_grpc_when_started() -> None:
    command = service("gateway")["command"]
    host, port = (flag(command, "--triton-grpc") or "").rsplit(":", 1)
    assert host == "triton" and host in compose()["services"]
    assert int(port) == Server().grpc_port


def test_compose_gateway_waits_for_healthy_triton_when_starting() -> None:
    depends = service("gateway")["depends_on"]
    assert depends["triton"]["condition"] == "service_healthy"
    assert "healthcheck" in service("triton")


def test_compose_publishes_ports_on_loopback_only_when_any_published() -> None:
    published = {name: svc.get("ports", []) for name, svc in compose()["services"].items()}
    assert published["gateway"], "the gateway must be published"
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert f"127.0.0.1:{Gateway().port}:8080" in published["gateway"]
    assert flag(service("gateway")["command"], "--port") == "8080"


def test_compose_gateway_redis_url_names_redis_service_when_configured() -> None:
    url = urlsplit(service("gateway")["environment"]["SLUICE_REDIS_URL"])
    assert url.scheme == "redis" and url.port == REDIS_PORT
    assert url.hostname in compose()["services"]
    redis = service(str(url.hostname))
    assert str(redis["image"]).split(":")[0] == "redis"
    assert "--port" not in redis.get("command", [])  # so it listens on the default 6379
    assert url.hostname in service("gateway")["depends_on"]


def test_compose_gateway_takes_api_keys_from_host_env_when_configured() -> None:
    keys = service("gateway")["environment"]["SLUICE_API_KEYS"]
    assert re.fullmatch(r"\$\{SLUICE_API_KEYS(:?[?-][^}]*)?\}", keys)


def test_compose_gateway_healthcheck_probes_open_health_route_when_defined() -> None:
    test = " ".join(service("gateway")["healthcheck"]["test"])
    assert "127.0.0.1:8080/health" in test


def test_compose_gateway_reads_same_repository_as_triton_when_mounted() -> None:
    gateway = service("gateway")
    target = flag(gateway["command"], "--repository")
    assert ("./model_repository", target, "ro") in [short_volume(v) for v in gateway["volumes"]]


def test_compose_config_validates_when_compose_cli_installed() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    env = {**os.environ, "SLUICE_API_KEYS": "k" * 16}
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def mounted(name: str, target: str) -> Path:
    """The host path compose mounts read-only at ``target`` in service ``name``."""
    volumes = map(short_volume, service(name)["volumes"])
    (source,) = [src for src, dst, mode in volumes if dst == target and mode == "ro"]
    return ROOT / source


def test_compose_prometheus_scrapes_triton_and_gateway_metrics_ports_when_started() -> None:
    prometheus = service("prometheus")
    config_path = flag(prometheus["command"], "--config.file") or ""
    config = yaml.safe_load(mounted("prometheus", config_path).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {job: [t for static in jobs[job]["static_configs"] for t in static["targets"]] for job in jobs}
    assert targets["triton"] == [f"triton:{Server().metrics_port}"]
    assert targets["gateway"] == [f"gateway:{flag(service('gateway')['command'], '--port')}"]
    assert jobs["gateway"].get("metrics_path", "/metrics") == "/metrics"
    assert "/metrics" in OPEN_PATHS  # scraped without an API key
    assert {"triton", "gateway"} <= set(prometheus["depends_on"])


def test_compose_grafana_provisions_prometheus_and_the_sluice_dashboard_when_started() -> None:
    provisioning = mounted("grafana", "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and f"127.0.0.1:{url.port}:{url.port}" in service("prometheus")["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sluice.yml").read_text())["providers"]
    dashboards = mounted("grafana", provider["options"]["path"])
    assert (dashboards / "sluice.json").is_file()
    environment = service("grafana")["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD(:?[?-][^}]*)?\}", environment["GF_SECURITY_ADMIN_PASSWORD"])


# --- deploy/k8s -------------------------------------------------------------------------------------------------


def test_k8s_manifests_parse_with_unique_names_when_loaded() -> None:
    docs = k8s_documents()
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert all(d.get("apiVersion") for d in docs)
    assert len(keys) == len(set(keys))
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim"} <= {kind for kind, _ in keys}


def schema_errors(doc: dict[str, Any]) -> str | None:
    """What the Kubernetes JSON Schema of ``doc``'s kind refuses in it (strict: unknown fields too); None when valid.

    The schemas ship inside kubernetes-validate, so nothing is fetched. A kind with no schema there (a CRD such as
    the Prometheus Operator's ServiceMonitor) is an error too: these manifests use core kinds only.
    """
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{'.'.join(map(str, error.path))}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return str(error.message)
    return None


def test_k8s_manifests_validate_against_kubernetes_schemas_when_checked_offline() -> None:
    failures = {f"{d['kind']}/{d['metadata']['name']}": schema_errors(d) for d in k8s_documents()}
    assert {name: error for name, error in failures.items() if error} == {}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= {d["kind"] for d in k8s_documents()}


@pytest.mark.parametrize(
    ("kind", "name", "break_it", "refused"),
    [
        # A misspelt field: YAML and a dict lookup would both take it; the API server would refuse it.
        ("Deployment", "gateway", lambda d: d["spec"].update(replica=3), "'replica' was unexpected"),
        ("Deployment", "triton", lambda d: container(d)["ports"][0].update(containerPort="eight thousand"),
         "containerPort"),
        ("Service", "triton-headless", lambda d: d["spec"].update(clusterIp="None"), "'clusterIp' was unexpected"),
        ("HorizontalPodAutoscaler", "triton", lambda d: d["spec"]["metrics"][0]["pods"]["target"].pop("type"),
         "'type' is a required property"),
        ("HorizontalPodAutoscaler", "triton", lambda d: d["spec"].update(minReplicas="2"), "minReplicas"),
        ("Deployment", "gateway", lambda d: d.update(kind="ServiceMonitor"), "ServiceMonitor"),
    ],
)
def test_k8s_schema_validation_refuses_broken_manifest_when_a_field_is_wrong(
    kind: str, name: str, break_it: Any, refused: str
) -> None:
    doc = one(kind, name)
    assert schema_errors(doc) is None
    break_it(doc)
    error = schema_errors(doc)
    assert error is not None and refused in error


def test_k8s_triton_runs_several_replicas_one_gpu_each_when_deployed() -> None:
    deployment = one("Deployment", "triton")
    hpa = one("HorizontalPodAutoscaler", "triton")
    assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"] >= 2
    # A rolling update that never needs a GPU beyond the replicas' own.
    rolling = deployment["spec"]["strategy"]
    assert rolling["type"] == "RollingUpdate" and rolling["rollingUpdate"]["maxSurge"] == 0
    assert str(container(deployment)["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    # No ClusterIP Service in front of Triton: one would pin each gateway's connection to one pod.
    triton_services = [s for s in k8s("Service") if [d["metadata"]["name"] for d in selected_deployments(s)] ==
                       ["triton"]]
    assert [s["spec"].get("clusterIP") for s in triton_services] == ["None"]


def test_k8s_hpa_scales_triton_on_queue_time_per_pod_when_defined() -> None:
    spec = one("HorizontalPodAutoscaler", "triton")["spec"]
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "triton")
    assert spec["maxReplicas"] > spec["minReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "triton_queue_us_per_request"
    assert metric["pods"]["target"]["type"] == "AverageValue"


def test_k8s_gateway_pods_are_annotated_for_scraping_their_metrics_port_when_deployed() -> None:
    deployment = one("Deployment", "gateway")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(container(deployment)["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in OPEN_PATHS


def test_k8s_grafana_dashboard_configmap_is_labelled_for_grafanas_sidecar_when_applied() -> None:
    configmap = one("ConfigMap", "sluice-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    # The JSON itself is compared with deploy/monitoring/dashboards/sluice.json in tests/test_dashboard.py.
    assert json.loads(configmap["data"]["sluice.json"])["uid"] == "sluice-services"


def test_k8s_adapter_rule_serves_hpa_metric_from_triton_counters_when_configured() -> None:
    config = yaml.safe_load(one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = config["rules"]
    (metric,) = one("HorizontalPodAutoscaler", "triton")["spec"]["metrics"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["name"]["matches"] in rule["seriesQuery"] == 'nv_inference_queue_duration_us{namespace!="",pod!=""}'
    # Per pod (a `Pods` metric), and queue time divided by the requests it was spent on.
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    query = " ".join(rule["metricsQuery"].split())
    assert re.search(r"delta\(nv_inference_queue_duration_us\{<<\.LabelMatchers>>\}\[30s\]\)\s*/\s*"
                     r"\(1 \+ delta\(nv_inference_request_success\{<<\.LabelMatchers>>\}\[30s\]\)\)", query)
    assert query.endswith("by (<<.GroupBy>>)")
    # Triton's metrics port is what Prometheus is told to scrape.
    annotations = one("Deployment", "triton")["spec"]["template"]["metadata"]["annotations"]
    metrics_port = [p for p in container(one("Deployment", "triton"))["ports"] if p["name"] == "metrics"]
    assert annotations["prometheus.io/port"] == str(metrics_port[0]["containerPort"]) == str(Server().metrics_port)


def test_k8s_deployment_selector_matches_pod_labels_when_defined() -> None:
    for deployment in k8s("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_service_selects_exactly_one_deployment_when_defined() -> None:
    for svc in k8s("Service"):
        names = [d["metadata"]["name"] for d in selected_deployments(svc)]
        assert len(names) == 1, f"Service {svc['metadata']['name']} selects {names}"


def test_k8s_service_target_ports_exist_on_containers_when_defined() -> None:
    for svc in k8s("Service"):
        (deployment,) = selected_deployments(svc)
        ports = container(deployment)["ports"]
        for spec in svc["spec"]["ports"]:
            target = spec.get("targetPort", spec["port"])
            if isinstance(target, int):
                assert target in {p["containerPort"] for p in ports}, (svc["metadata"]["name"], target)
            else:
                assert target in {p.get("name") for p in ports}, (svc["metadata"]["name"], target)


def test_k8s_triton_requests_one_gpu_and_probes_readiness_when_deployed() -> None:
    cont = container(one("Deployment", "triton"))
    assert str(cont["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    probe = cont["readinessProbe"]["httpGet"]
    assert probe["path"] == "/v2/health/ready" and probe["port"] == 8000
    assert 8000 in {p["containerPort"] for p in cont["ports"]}


def test_k8s_triton_mounts_claim_read_only_when_at_model_repository_path() -> None:
    deployment = one("Deployment", "triton")
    cont = container(deployment)
    target = flag(cont["args"], "--model-repository")
    (mount,) = [m for m in cont["volumeMounts"] if m["mountPath"] == target]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert flag(cont["args"], "--cache-config") == f"local,size={Server().response_cache_bytes}"


def test_k8s_triton_has_shared_memory_for_python_backend_when_deployed() -> None:
    deployment = one("Deployment", "triton")
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_k8s_gateway_runs_two_replicas_when_deployed() -> None:
    assert one("Deployment", "gateway")["spec"]["replicas"] >= 2


def test_k8s_gateway_probes_open_routes_when_deployed() -> None:
    cont = container(one("Deployment", "gateway"))
    assert cont["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8080}
    assert cont["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8080}


def triton_grpc_target() -> tuple[str, str, int]:
    """(Service name, namespace, port) of the gateway's ``dns:///<service>.<namespace>.svc.cluster.local:<port>``."""
    target = flag(container(one("Deployment", "gateway"))["args"], "--triton-grpc") or ""
    match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target)
    assert match, f"--triton-grpc {target!r} is not a dns:/// name of a Service"
    return match[1], match[2], int(match[3])


def test_k8s_gateway_reaches_triton_grpc_through_headless_service_when_started() -> None:
    name, namespace, port = triton_grpc_target()
    svc = one("Service", name)
    # Headless: the name resolves to every ready Triton pod, which gRPC's dns resolver hands to the channel.
    assert svc["spec"]["clusterIP"] == "None"
    assert service_target(svc, port) == Server().grpc_port
    assert [d["metadata"]["name"] for d in selected_deployments(svc)] == ["triton"]
    # The namespace the README creates; the manifests themselves name none (they go where kubectl points).
    assert namespace == "sluice"
    assert f"kubectl create namespace {namespace}" in (ROOT / "deploy" / "README.md").read_text()
    assert all("namespace" not in d["metadata"] for d in k8s_documents() if d["kind"] != "ConfigMap")


def test_k8s_triton_grpc_target_is_a_channel_target_grpc_resolves_when_dialled() -> None:
    """The gateway's channel (gateway/triton.py) takes the dns:/// form: dialled at a local server under the
    same scheme, it connects."""

    async def dial() -> None:
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        triton = Triton(f"dns:///localhost:{port}")
        try:
            await asyncio.wait_for(triton._channel.channel_ready(), timeout=10)
        finally:
            await triton.close()
            await server.stop(None)

    asyncio.run(dial())


def test_k8s_gateway_redis_url_names_redis_service_when_configured() -> None:
    url = urlsplit(env_var(container(one("Deployment", "gateway")), "SLUICE_REDIS_URL")["value"])
    assert url.scheme == "redis"
    redis_service = one("Service", str(url.hostname))
    assert service_target(redis_service, int(url.port or REDIS_PORT)) == REDIS_PORT
    (deployment,) = selected_deployments(redis_service)
    assert str(container(deployment)["image"]).split(":")[0] == "redis"


def test_k8s_gateway_api_keys_come_from_existing_secret_when_configured() -> None:
    ref = env_var(container(one("Deployment", "gateway")), "SLUICE_API_KEYS")["valueFrom"]["secretKeyRef"]
    secret = one("Secret", ref["name"])
    assert ref["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}


def test_k8s_gateway_reads_repository_claim_when_mounted() -> None:
    deployment = one("Deployment", "gateway")
    cont = container(deployment)
    (mount,) = [m for m in cont["volumeMounts"] if m["mountPath"] == flag(cont["args"], "--repository")]
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True
    one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_k8s_gateway_args_match_compose_when_both_deploy_gateway() -> None:
    """The same flags and values but Triton's address: one container in compose, a headless Service here."""
    compose_args = [str(a) for a in service("gateway")["command"]]
    k8s_args = container(one("Deployment", "gateway"))["args"]
    assert [a for a in k8s_args if a.startswith("--")] == [a for a in compose_args if a.startswith("--")]
    for name in [a for a in compose_args if a.startswith("--") and a != "--triton-grpc"]:
        assert flag(k8s_args, name) == flag(compose_args, name), name


# --- .dockerignore and the gateway CLI ---------------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern matching a parent covers the path."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        bare = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c.split("/")[-1], bare) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out_of_context_when_building() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in [
        ".venv/bin/python",
        "models/x",
        ".sluice/cache/y",
        "tests/test_cli.py",
        "model_repository/a",
        ".git/HEAD",
        "sluice/__pycache__/cli.cpython-311.pyc",
    ]:
        assert dockerignored(path, patterns), path
    for path in [
        "pyproject.toml",
        "README.md",
        "sluice/cli.py",
        "gateway/__init__.py",
        "compiler/schema.py",
        "runtimes/llm.py",
    ]:
        assert not dockerignored(path, patterns), path


def test_gateway_cli_accepts_deploy_flags_when_started_from_compose() -> None:
    result = CliRunner().invoke(app, ["gateway", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in [a for a in service("gateway")["command"] if str(a).startswith("--")]:
        assert name in result.output, f"`sluice gateway` has no {name}"


def test_gateway_settings_read_deploy_env_when_set() -> None:
    environment = service("gateway")["environment"]
    settings = GatewaySettings.from_repository(
        ROOT / "tests" / "golden" / "seed",
        triton_grpc=flag(service("gateway")["command"], "--triton-grpc"),
        host="0.0.0.0",
        environ={"SLUICE_REDIS_URL": environment["SLUICE_REDIS_URL"], "SLUICE_API_KEYS": "k" * 16 + ", " + "j" * 16},
    )
    assert settings.redis_url == "redis://redis:6379/0"
    assert len(settings.key_digests) == 2
    assert settings.triton_grpc == "triton:8001"
