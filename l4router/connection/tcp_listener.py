"""A TCP listener's factory: admission at the accept (before a byte is read), one
InboundConnection per admitted client, and the listener's live connections."""

import ipaddress

from twisted.internet import defer
from twisted.internet.protocol import Factory

from l4router.connection.addresses import normalise_host
from l4router.connection.listener import ListenerRuntime
from l4router.connection.tcp import InboundConnection


class ListenerFactory(ListenerRuntime, Factory):
    """Builds one InboundConnection per admitted client of one listener."""

    noisy = False

    def __init__(self, *args, **kwargs):
        self.connections = set()
        self._drain_waiters = []
        super().__init__(*args, **kwargs)

    def buildProtocol(self, addr):
        peer = getattr(addr, "host", None)
        peer = normalise_host(peer) if peer else str(addr)
        header_expected = self._trusts(peer)
        # Behind a trusted PROXY-protocol balancer the peer is the balancer: the per-source
        # limit waits for the header. Anyone else is counted by their own address.
        refusal = self.admission.admit(None if header_expected else peer)
        if refusal is not None:
            # Returning None makes the port close the socket at once, without reading.
            self.metrics.rejected(refusal).inc()
            self.refused_total += 1
            self.refusals.event(refusal, self.log_refusals)
            return None
        self.accepted_total += 1
        self.metrics.accepted.inc()
        self.metrics.active.inc()
        connection = InboundConnection(self, peer, getattr(addr, "port", 0), header_expected)
        self.connections.add(connection)
        return connection

    def _trusts(self, peer):
        """The peer may put a PROXY header in front of its stream (`accept_proxy_protocol`)."""
        trusted = self.listener.accept_proxy_protocol
        if not trusted:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in trusted)

    def connection_ended(self, connection):
        self.connections.discard(connection)
        self.admission.release(connection.source if connection.source_counted else None)
        self.metrics.active.dec()
        if not self.connections:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def bytes_relayed(self):
        """Both ways, ended connections and open ones: what the throughput is measured on."""
        live = sum(c.received + c.backend.received for c in self.connections if c.relay is not None)
        return self.bytes_closed + live

    def when_drained(self):
        """A Deferred that fires once no connection of this listener is left."""
        if not self.connections:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._drain_waiters.append(waiter)
        return waiter
