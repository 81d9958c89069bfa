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


class IdleWatch:
    """Calls `on_idle` once `counts()` has not changed for `timeout` seconds.

    The counters are compared every timeout/4 instead of resetting a timer for every chunk,
    so the relay's hot path does no timer work at all.
    """

    def __init__(self, clock, timeout, counts, on_idle):
        self.clock = clock
        self.timeout = timeout
        self.counts = counts
        self.on_idle = on_idle
        self._call = None
        self._last = None
        self._since = 0.0

    def start(self):
        self._last = self.counts()
        self._since = self.clock.seconds()
        self._schedule()

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self):
        self._call = self.clock.callLater(self.timeout / IDLE_CHECKS_PER_TIMEOUT, self._check)

    def _check(self):
        self._call = None
        counts = self.counts()
        now = self.clock.seconds()
        if counts != self._last:
            self._last, self._since = counts, now
        elif now - self._since >= self.timeout:
            self.on_idle()
            return
        self._schedule()


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
        self.on_end = on_end
        self.reason = None
        self.lost = set()
        self.idle = IdleWatch(clock, idle_timeout, self.counts,
                              lambda: self.close(IDLE_TIMEOUT, abort=True))
        backend.relay = self

    def counts(self):
        return self.client.received, self.backend.received

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
        self.idle.start()

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

    def _end(self):
        self.idle.stop()
        self.backend.relay = None
        self.on_end(self.reason)
