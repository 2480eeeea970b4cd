"""``--triton-grpc`` as a gRPC channel target: one Triton, or several replicas (a list, or a name that resolves to
several addresses), which the channel's round_robin policy spreads calls over (triton.py)."""

from __future__ import annotations

import ipaddress

from sluice.errors import SluiceError


def grpc_target(url: str) -> tuple[str, int]:
    """The gRPC channel target for ``--triton-grpc`` and the number of endpoints it names.

    ``host:port`` and ``dns:///name:port`` (a name resolving to several addresses: a Kubernetes headless Service)
    go to gRPC as they are, counted as one; a comma-separated list of IP addresses (``10.0.0.5:8001,10.0.0.6:8001``,
    IPv6 as ``[::1]:8001``) becomes gRPC's ``ipv4:``/``ipv6:`` multi-address target. gRPC resolves one name per
    target, so a list takes IP addresses only."""
    endpoints = [part.strip() for part in url.split(",")]
    if len(endpoints) == 1:
        return endpoints[0], 1
    families: set[int] = set()
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise SluiceError(
                f"--triton-grpc {url!r}: {endpoint!r} is not an IP address and port; a list of Tritons takes IP "
                "addresses (10.0.0.5:8001,10.0.0.6:8001), a name that resolves to several takes dns:///name:port"
            ) from None
        if not port.isdigit():
            raise SluiceError(f"--triton-grpc {url!r}: {endpoint!r} has no port")
        families.add(address.version)
    if len(families) > 1:
        raise SluiceError(f"--triton-grpc {url!r}: mixes IPv4 and IPv6 addresses; gRPC takes one family a list")
    return f"ipv{families.pop()}:{','.join(endpoints)}", len(endpoints)
