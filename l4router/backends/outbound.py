"""A TCP connection to a server, made for one client without Twisted's Connector.

connectTCP builds a Connector and a Client, passes the address through a Deferred, starts the
connect on the next turn of the loop (callLater(0)), sets O_NONBLOCK twice, asks SO_ERROR
before connecting and again after, and calls connect() a second time to learn that the first
succeeded: for a proxy that connects once per client, most of what a new connection costs in
Python. Here the socket is non-blocking from its socket() call, the connect starts at once,
and the first writability says it succeeded (a failed connect is an error event instead, and
only then is SO_ERROR asked for its errno). Once connected it is a Stream
(l4router.connection.stream), like the client it is made for.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.python.failure import Failure

from l4router.connection.stream import Stream

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
_IN_PROGRESS = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


def _socket_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """The family and connect() address of an IP literal (a scoped IPv6 one is looked up
    numerically, for its scope id)."""
    if ":" not in host:
        return socket.AF_INET, (host, port)
    if "%" in host:
        return socket.AF_INET6, socket.getaddrinfo(host, port, 0, 0, 0, _NUMERIC)[0][4]
    return socket.AF_INET6, (host, port, 0, 0)


def failure_reason(failure: Failure) -> str:
    """A short label for why a connect failed (metrics, logs): refused, timeout, ..."""
    for kind, label in (
        (error.ConnectionRefusedError, "refused"),
        (error.TimeoutError, "timeout"),
        (error.DNSLookupError, "dns"),
        (error.NoRouteError, "unreachable"),
    ):
        if failure.check(kind):
            return label
    return "error"


class OutboundConnection(Stream):
    """Connects at once to `host`:`port` (an IP literal), from `source` when given (transparent
    mode: the client's own address, with IP_TRANSPARENT). `protocol.makeConnection` is called
    once connected; `failed(failure)` once if it never is (refused, `fail()` from a timeout,
    `stop()` from a cancel). Every failure is reported on a later turn of the loop or from an
    event, never from within the constructor."""

    _connecting = True
    _opened = False  # it has a socket (making one can fail: no descriptor left)

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        protocol: Any,
        failed: Callable[[Failure], object],
        source: str | None = None,
    ) -> None:
        self.reactor = reactor  # a failure to make a socket is reported through it too
        self.host, self.port = host, port
        self._failed: Callable[[Failure], object] | None = failed
        try:
            family, target = _socket_address(host, port)
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            super().__init__(reactor, sock, protocol, connecting=True)
            self._opened = True
            # Relayed bytes go out at once (a proxy must not add Nagle delays).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source is not None:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((source, 0))
            code = sock.connect_ex(target)
        except OSError as exc:
            # No descriptor left; EPERM without CAP_NET_ADMIN; a source of the other family.
            self._fail_later(error.ConnectError(string=str(exc)))
            return
        if code not in _IN_PROGRESS:
            self._fail_later(error.getConnectError((code, os.strerror(code))))
            return
        self._write_on()  # writable once the connect has succeeded

    def _fail_later(self, exc: Exception) -> None:
        self.reactor.callLater(0, self.fail, exc)  # type: ignore[attr-defined]

    def doWrite(self) -> None:
        if not self._connecting:
            super().doWrite()
            return
        self._connecting = False
        self._failed = None  # never needed again: a reference cycle less to collect
        self._write_off()
        self.start()

    def fail(self, exc: Exception) -> None:
        """End the attempt if it has not connected: `failed` is called with `exc`."""
        if not self._connecting:
            return
        self._connecting = False
        if self._opened:
            self._unwatch()
            self.socket.close()
        failed, self._failed = self._failed, None
        if failed is not None:
            failed(Failure(exc))

    def stop(self) -> None:
        """Cancel the attempt (the client left): `failed` is called, as for Twisted's
        stopConnecting."""
        self.fail(error.UserError())

    def connectionLost(self, reason: Failure) -> None:
        if self._connecting:  # the kernel reported the connect's failure (an error event)
            code = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.fail(
                error.getConnectError((code, os.strerror(code)))
                if code
                else error.ConnectError(string=reason.getErrorMessage())
            )
            return
        super().connectionLost(reason)
