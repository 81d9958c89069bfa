"""The two-way byte pump between a client and a backend connection.

Each transport is the other's streaming producer (a full write buffer pauses the other side's
reads, so memory stays bounded), a FIN is passed on as a half-close, an idle relay is closed,
and the bytes each way are counted. The relay ends exactly once, with one close reason.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

# Close reasons (the `reason` label of l4router_connections_closed_total).
COMPLETED = "completed"  # both sides finished sending
CLIENT_CLOSED = "client_closed"
CLIENT_RESET = "client_reset"
BACKEND_CLOSED = "backend_closed"
BACKEND_RESET = "backend_reset"
IDLE_TIMEOUT = "idle_timeout"
SHUTDOWN = "shutdown"

IDLE_CHECKS_PER_TIMEOUT = 4  # an idle relay is closed between 1 and 1.25 idle_timeouts


def _uncouple(transport):
    """Stop treating the other side as this transport's producer, so it can close."""
    if transport.producer is not None:
        transport.unregisterProducer()


@implementer(IHalfCloseableProtocol)
class BackendSide(Protocol):
    """The backend half of a relay: everything it reads goes to the client."""

    relay = None
    received = 0
    read_closed = False
    on_connected = None  # called once when a connect made for a client succeeds

    def connectionMade(self):
        if self.on_connected is not None:
            self.on_connected(self)

    def dataReceived(self, data):
        self.received += len(data)
        relay = self.relay
        if relay is None:
            self.spoiled()
            return
        relay.client.transport.write(data)

    def readConnectionLost(self):
        self.read_closed = True
        if self.relay is None:
            self.spoiled()
            return
        self.relay.side_finished_sending(self)

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        if self.relay is not None:
            self.relay.side_lost(self, reason)
        else:
            self.spoiled()

    def spoiled(self):
        """An event before any relay took this connection (a pooled spare overrides it)."""


class Relay:
    """Owns a client protocol and a BackendSide once the backend is connected.

    The client protocol is the listener's inbound protocol: it forwards what it reads to
    `relay.backend.transport`, counts it in its own `received`, and calls `side_lost` /
    `side_finished_sending` like BackendSide does.
    """

    def __init__(self, client, backend, clock, idle_timeout, on_end):
        self.client = client
        self.backend = backend
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_end = on_end
        self.reason = None
        self.lost = set()
        self._idle_check = None
        self._idle_since = 0.0
        self._last_counts = None
        backend.relay = self

    def start(self, replay, client_finished_sending):
        """Replay the peeked bytes, couple the two transports, and let the client be read."""
        client_transport = self.client.transport
        backend_transport = self.backend.transport
        if replay:
            backend_transport.write(replay)
        client_transport.registerProducer(backend_transport, True)
        backend_transport.registerProducer(client_transport, True)
        if client_finished_sending:
            self.side_finished_sending(self.client)
        else:
            client_transport.resumeProducing()
        self._idle_since = self.clock.seconds()
        self._last_counts = (self.client.received, self.backend.received)
        self._idle_check = self.clock.callLater(
            self.idle_timeout / IDLE_CHECKS_PER_TIMEOUT, self._check_idle)

    def peer_of(self, side):
        return self.backend if side is self.client else self.client

    def side_finished_sending(self, side):
        """A FIN from one side becomes a half-close towards the other."""
        peer = self.peer_of(side)
        if peer in self.lost:
            return
        _uncouple(peer.transport)  # `side` will produce nothing more
        if self.client.read_closed and self.backend.read_closed:
            self.close(COMPLETED)
        else:
            peer.transport.loseWriteConnection()

    def side_lost(self, side, reason):
        """One side is fully closed: close the other once it has flushed what it got."""
        if side in self.lost:
            return
        self.lost.add(side)
        if self.reason is None:
            clean = reason is None or reason.check(ConnectionDone) is not None
            if side is self.client:
                self.reason = CLIENT_CLOSED if clean else CLIENT_RESET
            else:
                self.reason = BACKEND_CLOSED if clean else BACKEND_RESET
        peer = self.peer_of(side)
        if peer not in self.lost:
            _uncouple(peer.transport)
            peer.transport.loseConnection()
        else:
            self._end()

    def close(self, reason, abort=False):
        """Close both sides (flushing first unless `abort`)."""
        if self.reason is None:
            self.reason = reason
        for side in (self.client, self.backend):
            if side not in self.lost:
                _uncouple(side.transport)
                if abort:
                    side.transport.abortConnection()
                else:
                    side.transport.loseConnection()

    def _check_idle(self):
        counts = (self.client.received, self.backend.received)
        now = self.clock.seconds()
        if counts != self._last_counts:
            self._last_counts = counts
            self._idle_since = now
        elif now - self._idle_since >= self.idle_timeout:
            self._idle_check = None
            self.close(IDLE_TIMEOUT, abort=True)
            return
        self._idle_check = self.clock.callLater(
            self.idle_timeout / IDLE_CHECKS_PER_TIMEOUT, self._check_idle)

    def _end(self):
        if self._idle_check is not None and self._idle_check.active():
            self._idle_check.cancel()
        self._idle_check = None
        self.backend.relay = None
        self.on_end(self.reason)
