"""sluice.json, the compiler -> gateway contract: written by one side, read strictly by the other."""

from __future__ import annotations

import json
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from compiler.pipeline import build_plan
from compiler.render import render_repository
from compiler.schema import Gateway
from gateway.settings import GatewaySettings
from sluice.errors import SluiceError
from sluice.manifest import MANIFEST_NAME, MANIFEST_VERSION, GatewayOptions, api_key_digest, client_host
from tests.helpers import MINIMAL, config_with, write_yaml

DATA = Path(__file__).parent / "data"


def compiled_manifest(tmp_path: Path, config: Path = DATA / "seed_config.yaml") -> Path:
    """A directory holding only the sluice.json compiled from ``config``, as the gateway reads it."""
    files = render_repository(build_plan(config).plan, {"embedding_service": "f" * 64})
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / MANIFEST_NAME).write_text(files[MANIFEST_NAME], encoding="utf-8")
    return repository


def edited(repository: Path, edit: object) -> Path:
    path = repository / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)  # type: ignore[operator]
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return repository


def test_gateway_reads_every_route_the_compiler_planned_when_the_seed_is_compiled(tmp_path: Path) -> None:
    plan = build_plan(DATA / "seed_config.yaml").plan
    settings = GatewaySettings.from_repository(compiled_manifest(tmp_path), environ={})
    planned = {service.name: service.gateway for service in plan.services}
    assert settings.routes.keys() == planned.keys()
    for name, route in settings.routes.items():
        expected_fingerprint = "f" * 64 if name == "embedding_service" else ""
        assert route == planned[name].model_copy(update={"fingerprint": expected_fingerprint})
    assert settings.triton_grpc == "127.0.0.1:8001"
    assert (settings.host, settings.port, settings.max_items) == ("127.0.0.1", 8080, 2048)


def test_gateway_refuses_the_manifest_naming_the_key_when_the_compiler_adds_a_route_field(tmp_path: Path) -> None:
    repository = edited(compiled_manifest(tmp_path), lambda m: m["services"]["llm_service"].update(priority=1))
    with pytest.raises(SluiceError) as error:
        GatewaySettings.from_repository(repository, environ={})
    assert "services.llm_service.priority: unknown key" in str(error.value)
    assert f"manifest version {MANIFEST_VERSION}" in str(error.value)


def test_gateway_refuses_the_manifest_naming_the_key_when_a_gateway_field_is_missing(tmp_path: Path) -> None:
    repository = edited(compiled_manifest(tmp_path), lambda m: m["gateway"].pop("max_items"))
    with pytest.raises(SluiceError, match=r"gateway\.max_items: missing"):
        GatewaySettings.from_repository(repository, environ={})


def test_gateway_refuses_the_manifest_when_its_version_differs(tmp_path: Path) -> None:
    repository = edited(compiled_manifest(tmp_path), lambda m: m.update(version=MANIFEST_VERSION - 1))
    with pytest.raises(SluiceError, match=f"version {MANIFEST_VERSION - 1}.*reads version {MANIFEST_VERSION}"):
        GatewaySettings.from_repository(repository, environ={})


def test_gateway_refuses_the_manifest_when_a_value_has_the_wrong_type(tmp_path: Path) -> None:
    repository = edited(compiled_manifest(tmp_path), lambda m: m["services"]["llm_service"].update(batch_size="4"))
    with pytest.raises(SluiceError, match=r"services\.llm_service\.batch_size"):
        GatewaySettings.from_repository(repository, environ={})


def test_manifest_gateway_options_cover_the_config_gateway_section_when_either_side_changes() -> None:
    # A key added to the config's gateway section must travel in the manifest (render fails otherwise), and the
    # manifest holds nothing the config does not say; only the keys change form (digests, never secrets).
    config_keys = set(Gateway.model_fields) - {"api_keys"}
    assert set(GatewayOptions.model_fields) == config_keys | {"api_key_sha256"}


def test_manifest_holds_key_digests_that_the_gateway_accepts_when_keys_are_configured(tmp_path: Path) -> None:
    key = "k" * 16
    config = write_yaml(tmp_path, config_with({"gateway.api_keys": [key]}, MINIMAL))
    text = render_repository(build_plan(config).plan)[MANIFEST_NAME]
    assert key not in text
    (tmp_path / MANIFEST_NAME).write_text(text, encoding="utf-8")
    settings = GatewaySettings.from_repository(tmp_path, environ={"SLUICE_API_KEYS": "j" * 16})
    assert settings.key_digests == {api_key_digest(key), api_key_digest("j" * 16)}
    assert api_key_digest(key) == api_key_digest(key.encode())  # the header's bytes hash the same


@pytest.mark.parametrize(
    ("bound", "dialled"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "[::1]"), ("::1", "[::1]"),
     ("[::1]", "[::1]"), ("triton", "triton")],
)
def test_client_host_gives_a_dialable_address_when_the_server_binds(bound: str, dialled: str) -> None:
    assert client_host(bound) == dialled


def test_gateway_reaches_triton_over_ipv6_when_the_server_binds_loopback_v6(tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("[::1]:0")
    server.start()
    try:
        config = write_yaml(tmp_path, config_with({"server.host": "::1", "server.grpc_port": port}, MINIMAL))
        (tmp_path / MANIFEST_NAME).write_text(render_repository(build_plan(config).plan)[MANIFEST_NAME], "utf-8")
        target = GatewaySettings.from_repository(tmp_path, environ={}).triton_grpc
        assert target == f"[::1]:{port}"
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=5)  # times out when gRPC cannot dial the target
    finally:
        server.stop(None)
