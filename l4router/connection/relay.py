"""The two-way byte pump between a client and a backend connection.

Each transport is the other's streaming producer (a full write buffer pauses the other side's
reads, so memory stays bounded), a FIN is passed on as a half-close, an idle relay is closed,
and the bytes each way are counted. The relay ends exactly once, with one close reason.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import Attribute, Interface, classImplements, implementer

from l4router.connection.reasons import Reason
from l4router.connection.splice import AVAILABLE as SPLICE_AVAILABLE
from l4router.connection.splice import SpliceRelay
from l4router.twisted_private import buffered, close_flushed, half_close, sends_at_once, write_now

SWEEPS_PER_TIMEOUT = 8  # an idle relay is closed between 1 and 1.25 idle_timeouts
# A relay copies until a direction shows bulk: SPLICE_AFTER bytes carried and a single read of
# SPLICE_CHUNK or more. Then it splices (where it may). A short answer, or a keep-alive stream
# of small requests and answers, costs one recv and one send per chunk copied, where splice
# costs four calls and a pipe.
SPLICE_AFTER = 64 * 1024
SPLICE_CHUNK = 16 * 1024


class IdleSweeper:
    """Ends whatever has been idle for `timeout` seconds: relays, UDP sessions.

    One timer serves every watched owner: every timeout/8 it compares each owner's
    `activity()` (its byte or datagram counts) with what it was at the previous sweep, and
    calls `idled()` on those unchanged for `timeout`. Nothing happens per chunk, and an idle
    relay costs a dictionary entry instead of a timer of its own.
    """

    def __init__(self, clock, timeout):
        self.clock = clock
        self.timeout = timeout
        self.watched = {}  # owner -> (its activity when it last changed, when that was seen)
        self._call = None

    def watch(self, owner):
        self.watched[owner] = (owner.activity(), self.clock.seconds())
        if self._call is None:
            self._call = self.clock.callLater(self.timeout / SWEEPS_PER_TIMEOUT, self._sweep)

    def unwatch(self, owner):
        self.watched.pop(owner, None)
        if not self.watched and self._call is not None:
            self._call.cancel()
            self._call = None

    def _sweep(self):
        self._call = None
        now = self.clock.seconds()
        idle = []
        for owner, (last, since) in self.watched.items():
            activity = owner.activity()
            if activity != last:
                self.watched[owner] = (activity, now)
            elif now - since >= self.timeout:
                idle.append(owner)
        for owner in idle:
            self.watched.pop(owner, None)
            owner.idled()
        if self.watched and self._call is None:
            self._call = self.clock.callLater(self.timeout / SWEEPS_PER_TIMEOUT, self._sweep)


class IRelay(Interface):
    """What relays a client and its backend connection, both halves: the copying Relay, and
    the SpliceRelay it hands a bulk stream to. Each side (the client's protocol, BackendSide)
    has a `relay` attribute pointing at the relay in charge, which it tells what it reads and
    how it ends; the relay ends exactly once, calling `on_end(reason)`."""

    reason = Attribute("The close reason once known (a Reason).")

    def start(replay, client_finished_sending):
        """Send `replay` (the peeked bytes) to the backend first, then relay both ways."""

    def forward(side, data):
        """`side` read `data` (the splice relay reads its sockets itself)."""

    def side_finished_sending(side):
        """`side` sent its FIN: half-close towards the other."""

    def side_lost(side, reason):
        """`side`'s connection is gone (`reason`, a Failure, or None)."""

    def close(reason, abort=False):
        """End both sides (flushing first, unless `abort`)."""

    def activity():  # type: ignore[misc]  # zope's interface method style
        """What changes while bytes move (the IdleSweeper compares it)."""

    def idled():  # type: ignore[misc]
        """No activity for the idle timeout."""


classImplements(SpliceRelay, IRelay)


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
        relay = self.relay
        if relay is None:
            self.received += len(data)
            self.spoiled()
            return
        relay.forward(self, data)

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


@implementer(IRelay)
class Relay:
    """Owns a client protocol and a BackendSide once the backend is connected: copies.

    The client protocol is the listener's inbound protocol: it hands what it reads to
    `forward`, and calls `side_lost` / `side_finished_sending` like BackendSide does.

    With `splice`, once a direction shows bulk (SPLICE_AFTER, SPLICE_CHUNK) while nothing is
    buffered and neither side has finished, both sockets go to a SpliceRelay, which becomes
    the sides' relay.
    """

    def __init__(self, client, backend, idle, on_end, splice=False, rewrite_client=None):
        """`rewrite_client`: a filter (`feed(data)`, `done`) the client's bytes pass through
        until it is done (the removal of an elicited answer, say)."""
        self.client = client
        self.backend = backend
        self.idle = idle  # an IdleSweeper
        self.on_end = on_end
        self.splice_when_large = splice and SPLICE_AVAILABLE
        self.rewrite_client = rewrite_client
        self.reason = None
        self.lost = set()
        # Both Streams (a `unix:` listener's clients are Twisted's): each chunk is written
        # straight to the other side, without asking write_now what the transport is.
        self.both_streams = sends_at_once(client.transport) and sends_at_once(backend.transport)
        client.relay = backend.relay = self

    def forward(self, side, data):
        side.received += len(data)
        rewrite = self.rewrite_client
        if rewrite is not None and side is self.client:
            data = rewrite.feed(data)
            if rewrite.done:
                self.rewrite_client = None
        sink = (self.backend if side is self.client else self.client).transport
        if self.both_streams:
            sink.write(data)  # sent at once (write_now's case for Twisted's transports)
        else:
            write_now(sink, data)
        if (
            self.splice_when_large
            and self.rewrite_client is None
            and len(data) >= SPLICE_CHUNK
            and side.received >= SPLICE_AFTER
            and not buffered(sink)
            and not buffered(side.transport)
            and not (self.lost or self.client.read_closed or self.backend.read_closed)
        ):
            self._hand_over_to_splice()

    def _hand_over_to_splice(self):
        """Give both transports (nothing buffered, nothing ended) to a SpliceRelay."""
        self.splice_when_large = False
        self.idle.unwatch(self)
        for side in (self.client, self.backend):
            _uncouple(side.transport)
        successor = SpliceRelay(self.client, self.backend, self.idle, self.on_end)
        successor.start(b"", client_finished_sending=False)

    def activity(self):
        return self.client.received, self.backend.received

    def idled(self):
        self.close(Reason.IDLE_TIMEOUT, abort=True)

    def start(self, replay, client_finished_sending):
        """Replay the peeked bytes, couple the two transports, and let the client be read."""
        client_transport = self.client.transport
        backend_transport = self.backend.transport
        if replay:
            write_now(backend_transport, replay)
        client_transport.registerProducer(backend_transport, True)
        backend_transport.registerProducer(client_transport, True)
        if client_finished_sending:
            self.side_finished_sending(self.client)
        else:
            client_transport.resumeProducing()
        self.idle.watch(self)

    def peer_of(self, side):
        return self.backend if side is self.client else self.client

    def side_finished_sending(self, side):
        """A FIN from one side becomes a half-close towards the other."""
        peer = self.peer_of(side)
        if peer in self.lost:
            return
        _uncouple(peer.transport)  # `side` will produce nothing more
        if self.client.read_closed and self.backend.read_closed:
            self.close(Reason.COMPLETED)
        else:
            half_close(peer.transport)

    def side_lost(self, side, reason):
        """One side is fully closed: close the other once it has flushed what it got."""
        if side in self.lost:
            return
        self.lost.add(side)
        if self.reason is None:
            clean = reason is None or isinstance(reason.value, ConnectionDone)
            if side is self.client:
                self.reason = Reason.CLIENT_CLOSED if clean else Reason.CLIENT_RESET
            else:
                self.reason = Reason.BACKEND_CLOSED if clean else Reason.BACKEND_RESET
        peer = self.peer_of(side)
        if peer not in self.lost:
            _uncouple(peer.transport)
            self._close_side(peer)
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
                    self._close_side(side)

    def _close_side(self, side):
        if side.read_closed and not self.both_streams:
            close_flushed(side.transport)  # it said all it had: no shutdown before the close
        else:  # (a Stream closes at once when nothing is left to send)
            side.transport.loseConnection()

    def _end(self):
        self.idle.unwatch(self)
        self.backend.relay = None
        self.on_end(self.reason)
