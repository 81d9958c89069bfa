"""A named backend: its servers, and connecting one client to one of them."""

import ipaddress

from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from l4router.backends.balancing import SmoothWeightedRoundRobin
from l4router.errors import BackendUnavailable

log = Logger()

NO_SERVER_REACHABLE = "no_server_reachable"


def client_endpoint(reactor, server, timeout):
    """IP literals connect directly; names go through Twisted's resolver (never blocking)."""
    try:
        address = ipaddress.ip_address(server.host)
    except ValueError:
        return HostnameEndpoint(reactor, server.host.encode("idna"), server.port, timeout=timeout)
    endpoint_type = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    return endpoint_type(reactor, server.host, server.port, timeout=timeout)


def failure_reason(failure):
    """A short label for why a connect failed: refused, timeout, unreachable, ..."""
    for kind, label in ((error.ConnectionRefusedError, "refused"),
                        (error.TimeoutError, "timeout"),
                        (error.DNSLookupError, "dns"),
                        (error.NoRouteError, "unreachable")):
        if failure.check(kind):
            return label
    return "error"


class _ProtocolOnce(Factory):
    """Hands out one already-built protocol; quiet, unlike connectProtocol's factory."""

    noisy = False

    def __init__(self, protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


class BackendGroup:
    """Tries the balancer's choice, then fails over to each other server once."""

    def __init__(self, backend, reactor, metrics):
        self.config = backend
        self.name = backend.name
        self.reactor = reactor
        self.metrics = metrics
        self.balancer = SmoothWeightedRoundRobin(backend.servers)
        self.endpoints = {s: client_endpoint(reactor, s, backend.connect_timeout)
                          for s in backend.servers}

    @defer.inlineCallbacks
    def connect(self, protocol):
        """Connect `protocol` to a server; fires with the Server, or fails BackendUnavailable."""
        last = None
        for server in self.balancer.order():
            try:
                yield self.endpoints[server].connect(_ProtocolOnce(protocol))
            except defer.CancelledError:
                raise
            except Exception:
                last = Failure()
                reason = failure_reason(last)
                self.metrics.connect_failures.labels(self.name, server.label, reason).inc()
                log.warn("Backend {backend} server {server} failed: {reason}",
                         backend=self.name, server=server.label, reason=reason)
                continue
            return server
        raise BackendUnavailable(self.name, NO_SERVER_REACHABLE, last.getErrorMessage())
