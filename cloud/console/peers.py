"""The address a console request comes from: the connection's peer, or, when that peer is one
of the configured trusted proxies, the client its X-Forwarded-For names."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # aiohttp is loaded only where a console is served; config checks use this
    from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """`console_trusted_proxies` as networks ("10.0.0.5", "10.1.0.0/16", "fd00::/8");
    ValueError naming the entry that is neither an address nor a network."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address or network (e.g. 10.0.0.5 or 10.1.0.0/16)"
            ) from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[::1]:1234", as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "1.2.3.4:1234"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """Who sent `request`, for per-client limits. X-Forwarded-For is read only when the
    connection comes from a trusted proxy, and then from the right: each trusted hop appends
    the address it received from, so the rightmost address that is not a trusted proxy is the
    client (what a client wrote into the header itself sits left of it and is never used)."""
    peer = request.remote or "unknown"
    hop = _address(peer)
    if hop is None or not any(hop in n for n in trusted):
        return peer
    forwarded = [
        part
        for header in request.headers.getall("X-Forwarded-For", ())
        for part in header.split(",")
    ]
    for entry in reversed(forwarded):
        address = _address(entry)
        if address is None:
            break  # a hop wrote something that is no address: trust stops at the last one that did
        hop = address
        if not any(hop in n for n in trusted):
            break
    return str(hop)
