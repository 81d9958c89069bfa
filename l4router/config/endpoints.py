"""Listen addresses: the host:port shorthand, Twisted endpoint strings, and how many
workers a machine has for them."""

from __future__ import annotations

import functools
import ipaddress
import os
import re

from l4router.config.model import LISTEN_BACKLOG, MAX_WORKERS
from l4router.config.reader import _Invalid
from l4router.twisted_private import builtin_endpoint_types

_HOST_PORT_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-_*]*)):(?P<port>\d+)$"
)
_ENDPOINT_TYPES_WITHOUT_PROBE = ("systemd",)  # need the process environment to construct


def split_host_port(value):
    """`host:port` or `[v6]:port` -> (host, port); host may be empty."""
    match = _HOST_PORT_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _Invalid(f"must be host:port or [ipv6]:port, not {value!r}")
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise _Invalid(f"port must be 1-65535, not {port}")
    host = match.group("v6") if match.group("v6") is not None else match.group("host")
    if match.group("v6") is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{host!r} is not an IPv6 address") from None
    return host, port


def _endpoint_type(value):
    return value.split(":", 1)[0]


def listen_description(value, default_host=""):
    """A Twisted server endpoint string, or the `host:port` / `[v6]:port` shorthand ->
    endpoint string."""
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be an endpoint string or host:port, not {value!r}")
    match = _HOST_PORT_RE.match(value)
    if match is None or match.group("host") in _known_endpoint_types():
        description = value
    else:
        host, port = split_host_port(value)
        host = default_host if host in ("", "*") else host
        if ":" in host:
            description = f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
        else:
            description = f"tcp:{port}" + (f":interface={host}" if host else "")
        description += f":backlog={LISTEN_BACKLOG}"
    if _endpoint_type(description) not in _ENDPOINT_TYPES_WITHOUT_PROBE:
        from twisted.internet.endpoints import serverFromString

        try:
            # Construction binds nothing; it checks the syntax and the parameters.
            serverFromString(None, description)
        except (ValueError, KeyError, TypeError) as exc:
            raise _Invalid(f"bad endpoint {description!r}: {exc}") from None
    return description


@functools.cache
def _known_endpoint_types():
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    names = set(builtin_endpoint_types())
    names.update(p.prefix for p in getPlugins(IStreamServerEndpointStringParser))
    return names


def usable_cores():
    """The cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers(value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise _Invalid(
            f"must be auto or a number of processes from 1 to {MAX_WORKERS}, not {value!r}"
        )
    return value
