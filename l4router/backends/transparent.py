"""Transparent mode: connect to a server from the client's own address (`transparent: true`
on a backend), for servers that cannot read a PROXY header (OpenSSH, most databases).

The socket gets IP_TRANSPARENT (IPV6_TRANSPARENT) before it is bound to the client's address,
which Linux allows to a process with CAP_NET_ADMIN. The server's answers are addressed to the
client, so the routing must bring them back to this host and deliver them locally: see the
README ("Transparent mode") for the rules.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)


class _TransparentClient(tcp.Client):
    def createInternetSocket(self):
        skt = super().createInternetSocket()
        if self.addressFamily == socket.AF_INET6:
            skt.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            skt.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        return skt


class _TransparentConnector(tcp.Connector):
    def _makeTransport(self):
        return _TransparentClient(self.host, self.port, self.bindAddress, self, self.reactor)


def connect_from(reactor, source: str, host: str, port: int, factory, timeout: float):
    """connectTCP from `source` (an address that is not this host's). Like connectTCP, a
    failure (EPERM without CAP_NET_ADMIN, a source of the other family) reaches
    `factory.clientConnectionFailed`."""
    connector = _TransparentConnector(host, port, factory, timeout, (source, 0), reactor)
    connector.connect()
    return connector


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
