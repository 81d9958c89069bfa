"""Client addresses as routes, limits, logs and PROXY headers see them: one spelling each."""

from __future__ import annotations

import ipaddress

_MAPPED_PREFIX = "::ffff:"


def normalise_host(host: str) -> str:
    """An IPv4 client of a dual-stack socket arrives as `::ffff:a.b.c.d`; it is `a.b.c.d`
    for every rule, or IPv4 rules would not apply to it."""
    if host[:7].lower() == _MAPPED_PREFIX and "." in host:
        return host[7:]
    return host


def source_key(host: str, ipv6_prefix: int) -> str:
    """What a per-source limit counts: the address, or for IPv6 its prefix (one host usually
    holds a whole /64 and could otherwise take a connection per address)."""
    if ":" not in host or ipv6_prefix >= 128:
        return host
    try:
        network = ipaddress.IPv6Network((host.split("%", 1)[0], ipv6_prefix), strict=False)
    except ValueError:
        return host
    return str(network)


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets ([2001:db8::1]:443)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
