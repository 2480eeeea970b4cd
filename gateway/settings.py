"""What the gateway serves and enforces, read from the compiled repository's sluice.json.

The manifest is the deployable unit; a few things may come from the environment instead, so that secrets and
addresses stay out of it: ``SLUICE_API_KEYS`` (comma-separated keys, added to the manifest's digests),
``SLUICE_REDIS_URL`` (overrides ``gateway.redis_url``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sluice.errors import SluiceError

from .errors import NotFound

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Route:
    """One service as the gateway sees it (compiler/plan.py GatewayRoute, plus the model's fingerprint)."""

    service: str
    model: str
    type: str  # embedding | reranker | llm
    batch_size: int
    rate_limit: float
    total_timeout: float
    inference_timeout: float
    queue_timeout: float
    enable_cache: bool
    max_length: int
    fingerprint: str


@dataclass(frozen=True)
class GatewaySettings:
    routes: dict[str, Route]
    triton_grpc: str
    host: str = "127.0.0.1"
    port: int = 8080
    key_digests: frozenset[str] = frozenset()
    key_rate_limit: float | None = None
    redis_url: str | None = None
    cache_max_items: int = 100_000
    max_request_bytes: int = 4 * 1024 * 1024
    max_items: int = 2048

    @classmethod
    def from_repository(
        cls,
        repository: Path,
        *,
        triton_grpc: str | None = None,
        host: str | None = None,
        port: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> GatewaySettings:
        """Settings from ``<repository>/sluice.json``, the environment, then the arguments given."""
        manifest = _read_manifest(repository / "sluice.json")
        env = os.environ if environ is None else environ
        gateway, server = manifest["gateway"], manifest["server"]
        route_fields = {f.name for f in fields(Route)}
        routes = {
            name: Route(**{key: value for key, value in route.items() if key in route_fields})
            for name, route in manifest["services"].items()
        }
        keys = [key.strip() for key in env.get("SLUICE_API_KEYS", "").split(",") if key.strip()]
        digests = frozenset(gateway.get("api_key_sha256", [])) | {hashlib.sha256(k.encode()).hexdigest() for k in keys}
        values: dict[str, Any] = {
            "routes": routes,
            "triton_grpc": triton_grpc or f"{_client_host(server['host'])}:{server['grpc_port']}",
            "host": host or gateway["host"],
            "port": port or gateway["port"],
            "key_digests": digests,
            "key_rate_limit": gateway.get("key_rate_limit"),
            "redis_url": env.get("SLUICE_REDIS_URL") or gateway.get("redis_url"),
            "cache_max_items": gateway["cache_max_items"],
            "max_request_bytes": gateway["max_request_bytes"],
            "max_items": gateway["max_items"],
        }
        return cls(**values)

    def resolve(self, model: str, kinds: tuple[str, ...]) -> Route:
        """The route a request's ``model`` names: a service name, or a model key that one service serves."""
        candidates = [r for r in self.routes.values() if r.type in kinds]
        by_service = {r.service: r for r in candidates}
        if model in by_service:
            return by_service[model]
        by_model = [r for r in candidates if r.model == model]
        if len(by_model) == 1:
            return by_model[0]
        choices = ", ".join(sorted(by_service)) or "none"
        if len(by_model) > 1:
            raise NotFound(
                f"model {model!r} is served by several services; name one of: "
                f"{', '.join(sorted(r.service for r in by_model))}",
                param="model",
            )
        raise NotFound(f"model {model!r} does not exist here; choose one of: {choices}", param="model")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SluiceError(f"{path} not found: run `sluice compile` first") from None
    except (OSError, ValueError) as exc:
        raise SluiceError(f"{path}: unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise SluiceError(f"{path}: not a sluice manifest of version {MANIFEST_VERSION}; compile again")
    return manifest


def _client_host(host: str) -> str:
    # A server bound to every address is reached on loopback from this machine.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
