"""``sluice.json``: what the compiler tells the gateway, defined once for both sides.

The compiler writes it (``compiler/render.py``), the gateway reads it (``gateway/settings.py``); both use the
models below. Reading is strict: a key unknown to this version of Sluice, or one missing, is an error that names
the key and the manifest's version, so a field added on one side alone fails loudly instead of vanishing. Defaults
live in the config language (``compiler/schema.py``), never here: the manifest spells every value out.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from sluice.errors import SluiceError

MANIFEST_NAME = "sluice.json"
# Raised whenever the manifest's shape changes: a gateway refuses a repository compiled for another version.
MANIFEST_VERSION = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Route(_Strict):
    """One service as the gateway enforces it (what Triton cannot)."""

    service: str
    model: str  # the config's model key: clients may name it instead of the service
    type: Literal["embedding", "reranker", "llm"]
    batch_size: int  # the largest request Triton accepts: bigger client batches are split
    batch_timeout: float  # seconds a batch that is not full is held for company
    max_queue_size: int  # requests (chunks of at most batch_size items) that may wait
    instances: int  # model instances: the calls the gateway keeps in flight at once
    rate_limit: float  # requests per second
    total_timeout: float  # seconds, arrival to last byte
    inference_timeout: float
    queue_timeout: float
    enable_cache: bool
    max_length: int
    fingerprint: str  # digest of the model's content, part of the cache keys ("" before export)


class GatewayOptions(_Strict):
    """The config's ``gateway:`` section, API keys as digests (the manifest holds no secret)."""

    host: str
    port: int
    api_key_sha256: tuple[str, ...]
    key_rate_limit: float | None
    redis_url: str | None
    redis_failure: Literal["open", "closed"]  # what the gateway does while redis_url cannot be reached
    cache_max_items: int
    max_request_bytes: int
    max_items: int


class Manifest(_Strict):
    version: int
    triton_grpc: str  # host:port the gateway dials unless told otherwise (client_host of server.host)
    gateway: GatewayOptions
    services: dict[str, Route]


def api_key_digest(key: str | bytes) -> str:
    """The sha256 hex digest an API key travels and is compared as."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def client_host(host: str) -> str:
    """The address a client on this machine dials to reach a server bound to ``host``: loopback for a wildcard
    bind, an IPv6 address in brackets (valid in URLs and in gRPC targets alike)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (a comparison, not a bind)
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def manifest_text(manifest: Manifest) -> str:
    """The manifest as written: sorted keys, so compiling twice gives the same bytes."""
    return json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def parse_manifest(text: str, source: str) -> Manifest:
    """The manifest in ``text`` (read from ``source``, named in errors); SluiceError when it is not one this
    version of Sluice wrote."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SluiceError(f"{source}: not JSON: {exc}") from None
    version = data.get("version") if isinstance(data, dict) else None
    if version != MANIFEST_VERSION:
        raise SluiceError(
            f"{source}: manifest version {version!r}, but this gateway reads version {MANIFEST_VERSION}; "
            "compile the config again with this version of sluice"
        )
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise SluiceError(f"{source} (manifest version {MANIFEST_VERSION}): {problems}") from None


def _problem(error: Any) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: missing"
    return f"{path}: {error['msg']}"
