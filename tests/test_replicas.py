"""Two Triton replicas behind one gateway (`--triton-grpc ip:port,ip:port`): both serve, one SIGKILLed under load
costs the clients nothing (the call it held is retried on the other), both gone is 503 at once, and a replica
restarted on its ports is served again within a bound. Real tritonservers, one gateway, 16 closed-loop clients."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from compiler.schema import Server
from gateway.settings import GatewaySettings
from gateway.triton_target import grpc_target
from sluice.errors import SluiceError
from sluice.triton_server import TritonServer, TritonSettings, free_ports
from tests.gateway_server import GatewayServer
from tests.helpers import compiled_triton, metrics_text, sample_value

CLIENTS = 16
SERVED_AGAIN_WITHIN_S = 5.0  # after the restarted Triton is ready: gRPC's reconnect backoff is at most 1 s
SERVICE = "embed"
_texts = (f"replica text {i}" for i in itertools.count())


@dataclass
class Outcome:
    sent: float
    done: float
    status: int | str  # the HTTP status, or the transport error's name
    detail: str = ""  # a refusal's body


@dataclass
class Load:
    """``CLIENTS`` threads, each posting one embedding request after the other until stopped."""

    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(f"{self.url}/v1/embeddings", json={"model": SERVICE, "input": next(_texts)})
                    status: int | str = response.status_code
                    detail = "" if status == 200 else response.text[:300]
                except httpx.TransportError as error:
                    status, detail = type(error).__name__, str(error)
                self.outcomes.append(Outcome(sent, time.monotonic(), status, detail))


def successes(triton: TritonServer) -> float:
    return sample_value(metrics_text(triton.metrics_url), "nv_inference_request_success", model=SERVICE)


@pytest.mark.integration
def test_two_replicas_share_the_load_and_a_killed_one_costs_the_clients_nothing(
    tmp_path: Path, demo_models: dict[str, Path], export_cache: Path
) -> None:
    config = {
        "models": {"minilm": {"type": "embedding", "model_name": str(demo_models["all-MiniLM-L6-v2"])}},
        "services": {SERVICE: {"model": "minilm", "runtime": {
            "worker_count": 1, "enable_cache": False, "rate_limit": 100_000,
            # 16 clients on 2 busy cores wait longer than the default 50 ms queue budget: no refusal for that.
            "queue_timeout": 2.0, "inference_timeout": 5.0, "total_timeout": 10.0}}},
    }
    with compiled_triton(tmp_path, config, export_cache) as (first, repository):
        http_port, grpc_port, metrics_port = free_ports(3)
        second_settings = TritonSettings(repository, tmp_path / "work-second", Server(
            http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port))
        with TritonServer(second_settings, startup_timeout=240) as second:
            settings = GatewaySettings.from_repository(
                repository, triton_grpc=f"{first.grpc_url},{second.grpc_url}", environ={})
            assert settings.triton_replicas == 2
            with GatewayServer(settings) as gateway:
                report = under_load_with_kills(gateway.url, first, second)
    print("replicas:", report)


def under_load_with_kills(url: str, first: TritonServer, second: TritonServer) -> dict[str, float]:
    before = successes(first), successes(second)
    with Load(url) as load:
        time.sleep(3)
        both_served = successes(first) - before[0], successes(second) - before[1]
        assert min(both_served) > 0, f"requests served by each replica: {both_served}"

        assert second.pid is not None
        os.kill(second.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(3)
    at_kill = [o for o in load.outcomes if o.done >= killed_at]
    in_flight = sum(o.sent < killed_at for o in at_kill)
    failed = [o for o in at_kill if o.status != 200]
    refused_before = [o for o in load.outcomes if o.done < killed_at and o.status != 200]
    assert at_kill and not refused_before, refused_before[:3]
    # The call the killed replica held is sent again to the other: no client sees the kill.
    assert not failed, f"{len(failed)} of {len(at_kill)} failed after the kill ({in_flight} in flight): {failed[:3]}"

    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    time.sleep(0.5)
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/embeddings", json={"model": SERVICE, "input": "none left"}, timeout=30)
    refused_in = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.headers.get("Retry-After") and refused_in < 2, (response.headers, refused_in)

    second.stop()  # reaps the killed server and its stubs
    second.start()
    second.wait_until_ready(240)
    ready_at = time.monotonic()
    while (status := httpx.post(f"{url}/v1/embeddings", json={"model": SERVICE, "input": "back"},
                                timeout=30).status_code) != 200:
        assert time.monotonic() - ready_at < SERVED_AGAIN_WITHIN_S, f"still {status} after the restart"
        time.sleep(0.05)
    assert successes(second) >= 1
    return {"served_before_kill": sum(both_served), "first": both_served[0], "second": both_served[1],
            "in_flight_at_kill": in_flight, "requests_after_kill": len(at_kill), "failed_after_kill": len(failed),
            "both_down_503_s": round(refused_in, 3), "served_again_s": round(time.monotonic() - ready_at, 3)}


def test_a_list_of_addresses_becomes_one_round_robin_target_counting_its_replicas() -> None:
    assert grpc_target("127.0.0.1:8001, 127.0.0.1:9001") == ("ipv4:127.0.0.1:8001,127.0.0.1:9001", 2)
    assert grpc_target("[::1]:8001,[::1]:9001") == ("ipv6:[::1]:8001,[::1]:9001", 2)
    assert grpc_target("dns:///triton.default.svc:8001") == ("dns:///triton.default.svc:8001", 1)
    assert grpc_target("localhost:8001") == ("localhost:8001", 1)


@pytest.mark.parametrize(("target", "says"), [
    ("triton-a:8001,triton-b:8001", "dns:///name:port"),
    ("127.0.0.1:8001,[::1]:8001", "mixes IPv4 and IPv6"),
])
def test_a_list_grpc_cannot_resolve_is_refused_naming_the_option(target: str, says: str) -> None:
    with pytest.raises(SluiceError, match="--triton-grpc") as error:
        grpc_target(target)
    assert says in str(error.value)
