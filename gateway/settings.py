"""What the gateway serves and enforces, read from the compiled repository's sluice.json (sluice/manifest.py).

The manifest is the deployable unit; a few things may come from the environment instead, so that secrets and
addresses stay out of it: ``SLUICE_API_KEYS`` (comma-separated keys, added to the manifest's digests),
``SLUICE_REDIS_URL`` (overrides ``gateway.redis_url``), ``SLUICE_TRITON_REPLICAS`` (the Triton replicas behind
``triton_grpc``; default: the endpoints it lists, one for a single address or a ``dns:///`` name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sluice.errors import SluiceError
from sluice.manifest import MANIFEST_NAME, Manifest, Route, api_key_digest, parse_manifest

from .errors import NotFound
from .triton_target import grpc_target

__all__ = ["GatewaySettings", "Route"]


@dataclass(frozen=True)
class GatewaySettings:
    """The manifest's values, with the environment's and the command line's applied."""

    routes: dict[str, Route]
    triton_grpc: str
    host: str
    port: int
    key_digests: frozenset[str]
    key_rate_limit: float | None
    redis_url: str | None
    cache_max_items: int
    max_request_bytes: int
    max_items: int
    # While redis_url cannot be reached: "open" (limits in memory, cache bypassed) or "closed" (503).
    redis_failure: Literal["open", "closed"] = "open"
    # Tritons behind triton_grpc: the gateway keeps replicas x instances calls in flight a service.
    triton_replicas: int = 1

    @classmethod
    def from_repository(
        cls,
        repository: Path,
        *,
        triton_grpc: str | None = None,
        host: str | None = None,
        port: int | None = None,
        environ: Mapping[str, str] | None = None,
        triton_replicas: int | None = None,
    ) -> GatewaySettings:
        """Settings from ``<repository>/sluice.json``, the environment, then the arguments given."""
        manifest = _read_manifest(repository / MANIFEST_NAME)
        env = os.environ if environ is None else environ
        options = manifest.gateway
        keys = [key.strip() for key in env.get("SLUICE_API_KEYS", "").split(",") if key.strip()]
        triton_grpc = triton_grpc or manifest.triton_grpc
        return cls(
            routes=dict(manifest.services),
            triton_grpc=triton_grpc,
            host=host or options.host,
            port=port or options.port,
            key_digests=frozenset(options.api_key_sha256) | {api_key_digest(key) for key in keys},
            key_rate_limit=options.key_rate_limit,
            redis_url=env.get("SLUICE_REDIS_URL") or options.redis_url,
            cache_max_items=options.cache_max_items,
            max_request_bytes=options.max_request_bytes,
            max_items=options.max_items,
            redis_failure=options.redis_failure,
            triton_replicas=_replicas(triton_replicas, env.get("SLUICE_TRITON_REPLICAS"), triton_grpc),
        )

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


def _replicas(given: int | None, from_env: str | None, triton_grpc: str) -> int:
    if given is None and from_env:
        try:
            given = int(from_env)
        except ValueError:
            raise SluiceError(f"SLUICE_TRITON_REPLICAS={from_env!r}: not a whole number") from None
    if given is None:
        return grpc_target(triton_grpc)[1]
    if given < 1:
        raise SluiceError(f"--triton-replicas / SLUICE_TRITON_REPLICAS must be at least 1, not {given}")
    return given


def _read_manifest(path: Path) -> Manifest:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SluiceError(f"{path} not found: run `sluice compile` first") from None
    except OSError as exc:
        raise SluiceError(f"{path}: unreadable: {exc}") from None
    return parse_manifest(text, str(path))
