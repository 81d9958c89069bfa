"""Transparent mode: connect to a server from the client's own address (`transparent: true`
on a backend), for servers that cannot read a PROXY header (OpenSSH, most databases).

The socket gets IP_TRANSPARENT (IPV6_TRANSPARENT) before it is bound to the client's address
(l4router.backends.outbound), which Linux allows to a process with CAP_NET_ADMIN. The server's
answers are addressed to the client, so the routing must bring them back to this host and
deliver them locally: see the README ("Transparent mode") for the rules.
"""

from __future__ import annotations

import socket

from l4router.backends.outbound import IP_TRANSPARENT


def check_transparent_allowed() -> str | None:
    """Why this process cannot make transparent connections, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError as exc:
        return (
            f"IP_TRANSPARENT refused ({exc.strerror}): transparent mode needs CAP_NET_ADMIN "
            "(or CAP_NET_RAW)"
        )
    return None
