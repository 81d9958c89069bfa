"""TCP connections and listening sockets of l4router's own, below Twisted's transports.

For a proxy whose connections mostly carry one request, Twisted's tcp.Server and Port cost
a third of a connection's CPU around the system calls themselves: a log prefix built per
connection, every end passed through `_disconnectSelectable` with a Failure and a zope
adaptation for the half-close, writes buffered until the next turn of the loop. A Stream is
one object per socket, registered with the reactor as its own read and write descriptor: it
hands what it reads to its protocol, sends at once what the socket takes (buffering only the
rest), passes a FIN on with one shutdown and closes with one close.

It provides what l4router's protocols, relays, pool and health checks use of a TCP
transport (ITCPTransport, and a push producer for the other side of a relay), with one
difference on purpose: `loseConnection` with nothing left to send closes at once, and
the protocol's `connectionLost` is called before it returns (Twisted waits a turn of the
loop). An accepted socket stays in blocking mode (no ioctl per connection): every send and
recv passes MSG_DONTWAIT instead; `prepare_for_splice` is for what splices it.

On l4router's reactor (l4router.process.reactor) a Stream is registered with epoll once for
its whole life, edge-triggered: starting and stopping to read or write (a pause, a half-close,
a buffer filling and draining) only sets a flag here, and the close takes the socket out of
epoll. Edge-triggered means the kernel reports a change once, so a Stream keeps what it was
told: `readable` (bytes or an end may be waiting) until a read comes up short, and reads
what waits when it starts reading again. A full read leaves the rest for the next turn of
the loop (`read_again`), so that one busy stream does not starve the others; the peer's end
(EPOLLRDHUP) is read at once, and once it has been reported a short read means that the end
is all that is left (no read is made to learn it). On other reactors it uses
`addReader`/`addWriter` as any descriptor does, and so does a Stream the splice relay has
taken (one splice per event needs level-triggered events).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from typing import Any

from twisted.internet import address, defer, error
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
    IReadWriteDescriptor,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

READ_SIZE = 64 * 1024
WRITE_BUFFER = 64 * 1024  # buffered past this, the registered producer is paused
ACCEPTS_PER_EVENT = 64  # a burst of clients is taken a few dozen at a time, between events
# From a socket every worker accepts on, a worker takes this many per wake-up: the rest wake
# another worker, or this one once it has dealt with these (clients spread by load).
SHARED_ACCEPTS_PER_EVENT = 4
_DONTWAIT = socket.MSG_DONTWAIT
# The events that say the peer's side has ended (or failed): what is left is read at once.
_PEER_ENDED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_IN_OR_ENDED = select.EPOLLIN | _PEER_ENDED
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR
ACCEPT_PAUSE = 0.1  # seconds a port stops accepting when out of descriptors or memory
_DONE = Failure(error.ConnectionDone())
_LOST = Failure(error.ConnectionLost())
_HALF_CLOSEABLE: dict[type, bool] = {}
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# What accept(2) passes on from a client that is already gone (and EPERM from netfilter):
# that client is skipped, the next one accepted.
_CLIENT_GONE = {
    errno.ECONNABORTED,
    errno.EPERM,
    errno.EPROTO,
    errno.ENETDOWN,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETUNREACH,
}


def _lost(exc: OSError) -> Failure:
    """Why a stream ended when its socket failed."""
    return Failure(error.ConnectionLost(str(exc)))


def _half_closeable(protocol: Any) -> bool:
    kind = type(protocol)
    known = _HALF_CLOSEABLE.get(kind)
    if known is None:
        known = _HALF_CLOSEABLE[kind] = IHalfCloseableProtocol.implementedBy(kind)
    return known


def _tcp_address(host: str, port: int) -> address.IPv4Address | address.IPv6Address:
    """Twisted's address object for an IP literal and a port."""
    kind = address.IPv6Address if ":" in host else address.IPv4Address
    return kind("TCP", host, port)


def _peer_address(peer: tuple) -> address.IPv4Address | address.IPv6Address:
    """Twisted's address of what accept() returned (a scoped IPv6 host keeps its %zone)."""
    if len(peer) == 4 and peer[3]:
        host, _ = socket.getnameinfo(peer, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        return address.IPv6Address("TCP", host, peer[1])
    return _tcp_address(peer[0], peer[1])


@implementer(ITCPTransport, IReadWriteDescriptor, IHalfCloseableDescriptor, IPushProducer)
class Stream:
    """One connected TCP socket and its protocol: see the module's doc."""

    connected = False
    disconnecting = False  # loseConnection was called with bytes still to send
    disconnected = False
    producer: Any = None  # the other side of a relay, paused while this one's buffer is full
    _producer_paused = False
    _write_closing = False  # a half-close waits for the buffer to empty
    _write_closed = False
    _aborting = False
    # Edge-triggered (see the module's doc): what the stream wants, and what the kernel said.
    _edge = False  # on a reactor with watch_edges: registered once, edge-triggered
    _watched_writable = False  # its registration asks for writability too
    reading = False  # wants to read (the reactor asks before handing it a hang-up)
    _writing = False  # wants to write (bytes are buffered, or a connect is under way)
    readable = False  # bytes (or an end) may be waiting: an edge came, no read came up short
    _end_waiting = False  # EPOLLRDHUP/HUP/ERR seen: read on until the end is read
    _error_waiting = False  # EPOLLERR seen: the end is read (to learn the error), not assumed
    paused = False  # by the other side of a relay, with the peer's end still to be read
    peer_finished = False  # the peer's FIN has been read
    sends_at_once = True  # twisted_private.write_now: a write is sent now, not next turn

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        protocol: Any,
        peer: address.IPv4Address | address.IPv6Address | None = None,
        connecting: bool = False,
    ) -> None:
        """`peer`: its address when known already (accept() said it); `connecting`: a
        connect is under way (its writability will say it is done)."""
        self.reactor = reactor
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        self.pending = bytearray()  # what the socket has not taken yet, in order
        self._peer = peer
        if hasattr(reactor, "watch_edges"):  # registered once for the socket's whole life
            self._edge = True
            self._watched_writable = connecting
            reactor.watch_edges(self, connecting)

    def start(self) -> None:
        """Connected: read, and tell the protocol."""
        self.connected = True
        self._read_on()
        self.protocol.makeConnection(self)

    # What it wants from the reactor

    def _read_on(self) -> None:
        if not self._edge:
            self.reactor.addReader(self)
        elif not self.reading:
            self.reading = True
            if self.readable:  # what came while it was not reading: next turn
                self.reactor.read_again(self)

    def _read_off(self) -> None:
        if self._edge:
            self.reading = False
        else:
            self.reactor.removeReader(self)

    def _write_on(self) -> None:
        if not self._edge:
            self.reactor.addWriter(self)
            return
        self._writing = True
        if not self._watched_writable:  # accepted streams ask for it once they have to wait
            self._watched_writable = True
            self.reactor.watch_writable(self)

    def _write_off(self) -> None:
        if self._edge:
            self._writing = False
        else:
            self.reactor.removeWriter(self)

    def _unwatch(self) -> None:
        """Before its socket closes (which takes it out of epoll)."""
        if self._edge:
            self.reading = self._writing = False
            self.reactor.forget_edges(self)
        else:
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)

    def on_edge(self, event: int) -> None:
        """An edge-triggered event (the reactor has dealt with a hang-up it cannot read):
        what the kernel said is waiting is read until a read comes up short, the stream stops
        reading or it ends; a full read leaves the rest for the next turn."""
        if event & _OUT and self._writing:
            self.doWrite()
            if self.disconnected:
                return
        if not event & _IN_OR_ENDED:
            return
        if event & _PEER_ENDED:
            self._end_waiting = True
            if event & _ERR:
                self._error_waiting = True
        self.readable = True
        while self.reading:
            try:
                data = self.socket.recv(READ_SIZE, _DONTWAIT)
            except BlockingIOError:
                self.readable = False
                return
            except OSError as exc:
                self.readable = False
                self.connectionLost(_lost(exc))
                return
            if not data:
                self.readable = False
                self.readConnectionLost(_DONE)
                return
            full = len(data) == READ_SIZE
            self.readable = full or self._end_waiting
            self.protocol.dataReceived(data)
            if full:
                if self.reading:
                    self.reactor.read_again(self)
                return
            if self._end_waiting and not self._error_waiting:
                # The FIN had come before these bytes were read, and a short read took all
                # that was left: the end, without one more read to say so (an answer and the
                # close of `Connection: close`). A paused stream reads it once resumed.
                if self.reading:
                    self.readable = False
                    self.readConnectionLost(_DONE)
                return
            if not self.readable:
                return

    def logPrefix(self) -> str:
        return "l4router.stream"

    # Reading

    def doRead(self) -> None:
        """Level-triggered (another reactor, or the splice relay's): one read per event."""
        try:
            data = self.socket.recv(READ_SIZE, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.connectionLost(_lost(exc))
            return
        if data:
            self.protocol.dataReceived(data)
        else:
            self.readConnectionLost(_DONE)

    def hung_up(self, reading: bool) -> None:
        """The reactor saw a hang-up or an error with nothing this stream reads now: the end
        of what the peer sends while reading; once the peer's FIN has been read, a clean close
        (the reset that follows a FIN only says that bytes sent after it went unread: a server
        that closes without reading the request); otherwise the connection was lost."""
        if reading:
            self.readConnectionLost(_DONE)
        else:
            self.connectionLost(_DONE if self.peer_finished else _LOST)

    def readConnectionLost(self, reason: Failure) -> None:
        """The peer's FIN (or a hang-up the reactor saw while reading)."""
        self.peer_finished = True
        self.paused = False
        self._read_off()
        if _half_closeable(self.protocol):
            self.protocol.readConnectionLost()  # type: ignore[attr-defined]
        else:
            self.connectionLost(reason)

    # Writing

    def write(self, data: bytes) -> None:
        if not self.connected or self._write_closed or self._write_closing or not data:
            return
        if not self.pending:
            try:
                sent = self.socket.send(data, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # the peer is gone; ended on the next turn, as a failed
                # doWrite would end it (this one may not be reading: nothing else would tell)
                self.pending.clear()
                self.reactor.callLater(0, self.connectionLost, _lost(exc))  # type: ignore[attr-defined]
                self._write_closed = True  # nothing more is sent
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._write_on()
        self.pending += data
        if len(self.pending) > WRITE_BUFFER and self.producer is not None:
            self._producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def doWrite(self) -> None:
        pending = self.pending
        if pending:
            try:
                sent = self.socket.send(pending, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.connectionLost(_lost(exc))
                return
            del pending[:sent]  # a bytearray drops its front without copying the rest
            if pending:
                return
        self._write_off()
        if self._producer_paused:
            self._producer_paused = False
            self.producer.resumeProducing()
        if self.disconnecting:
            self._close(_DONE)
        elif self._write_closing:
            self._shut_write()

    def loseWriteConnection(self) -> None:
        """Send a FIN once everything written has gone."""
        if self._write_closed or not self.connected:
            return
        if self.pending:
            self._write_closing = True
        else:
            self._shut_write()

    def _shut_write(self) -> None:
        self._write_closing = False
        self._write_closed = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:  # the peer is gone: reading will say so
            pass
        if _half_closeable(self.protocol):
            self.protocol.writeConnectionLost()  # type: ignore[attr-defined]

    # Ending

    def loseConnection(self) -> None:
        """Close once everything written has gone (at once, when nothing is buffered)."""
        if not self.connected or self.disconnecting:
            return
        if self.pending and not self._write_closed:
            self.disconnecting = True
            self._read_off()
        else:
            self._close(_DONE)

    def abortConnection(self) -> None:
        """Close now, with a reset, dropping what is buffered; the protocol hears of it on
        the next turn of the loop, as from Twisted's transports."""
        if not self.connected or self._aborting:
            return
        self._aborting = True
        self.pending.clear()
        self._read_off()
        self._write_off()
        self.reactor.callLater(0, self._close, Failure(error.ConnectionAborted()))  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket fail (or a protocol's callback raised): close now."""
        self._close(reason)

    def _close(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.connected = False
        self.producer = None  # the relay closes the other side itself, with its reason
        self._unwatch()
        sock = self.socket
        if self._aborting:
            try:  # a reset, as Twisted's abortConnection sends
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        sock.close()
        protocol, self.protocol = self.protocol, None  # no cycle left for the collector
        protocol.connectionLost(reason)

    # A push producer (for the other side of a relay) and its consumer

    def pauseProducing(self) -> None:
        self.paused = not self.peer_finished
        self._read_off()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.connected and not (self.disconnecting or self._aborting or self.peer_finished):
            self._read_on()

    def stopProducing(self) -> None:
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None
        self._producer_paused = False

    # What the splice relay switches

    def startReading(self) -> None:
        self._read_on()

    def stopReading(self) -> None:
        self._read_off()

    def startWriting(self) -> None:
        self._write_on()

    def stopWriting(self) -> None:
        self._write_off()

    def prepare_for_splice(self) -> None:
        """Its descriptor is used without MSG_DONTWAIT (non-blocking now), and one splice per
        event needs level-triggered events: from now on the reactor's addReader/addWriter."""
        self.socket.setblocking(False)
        if self._edge:
            reading, writing = self.reading, self._writing
            self._edge = self.reading = self._writing = False
            self.reactor.level_trigger(self)
            if reading:
                self.reactor.addReader(self)
            if writing:
                self.reactor.addWriter(self)

    # Addresses and options

    def getPeer(self) -> address.IPv4Address | address.IPv6Address:
        if self._peer is None:
            self._peer = _peer_address(self.socket.getpeername())
        return self._peer

    def getHost(self) -> address.IPv4Address | address.IPv6Address:
        host, port = self.socket.getsockname()[:2]
        return _tcp_address(host, port)

    def getHandle(self) -> socket.socket:
        return self.socket

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)


@implementer(IListeningPort)
class StreamPort:
    """A listening TCP socket whose clients become Streams. The factory's `buildProtocol`
    admits a client (a protocol) or refuses it (None: closed before anything is read).

    `shared`: every worker accepts on this one socket (l4router.process.sockets) and takes a
    few clients per wake-up, so a worker busy with its connections leaves new ones to an idle
    one, which is woken at once: clients spread by load, where SO_REUSEPORT's hash spreads
    them by address and keeps piling them on a worker that has fallen behind (its connections
    last longer, so more of the live ones are there). Every waiting worker is woken
    (EPOLLEXCLUSIVE would wake one, but counts a stopped worker, one under a debugger say,
    as waiting: it would take every wake-up while it cannot accept)."""

    def __init__(self, reactor: Any, sock: socket.socket, factory: Any, shared: bool = False):
        self.reactor = reactor
        self.socket = sock
        self.fileno = sock.fileno
        self.factory = factory
        self.family = sock.family
        self.listening = False
        self.accepts_per_event = SHARED_ACCEPTS_PER_EVENT if shared else ACCEPTS_PER_EVENT

    def startListening(self) -> None:
        self.factory.doStart()
        self.listening = True
        self.reactor.addReader(self)

    def stopListening(self) -> defer.Deferred[None]:
        if self.listening:
            self.listening = False
            self.reactor.removeReader(self)
            self.socket.close()
            self.factory.doStop()
        return defer.succeed(None)

    def doRead(self) -> None:
        accept = self.socket._accept  # type: ignore[attr-defined]  # (fd, address): no socket object yet
        family = self.family
        build = self.factory.buildProtocol
        reactor = self.reactor
        for _ in range(self.accepts_per_event):
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:
                    continue
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise  # the socket itself is broken: the reactor stops this port
                self._pause(exc)
                return
            # (CPython asks getsockname to check that the descriptor is a socket: the one
            # getsockname a connection still costs.)
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            client = _peer_address(peer)
            protocol = build(client)
            if protocol is None:
                sock.close()
                continue
            Stream(reactor, sock, protocol, client).start()

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors or memory: the waiting clients stay queued, and this port stops
        reading for a moment (the socket stays readable: reading on would spin the worker and
        write a log line per turn of the loop)."""
        log.warn(
            "Could not accept a connection ({error}): accepting again in {pause}s",
            error=exc.strerror,
            pause=ACCEPT_PAUSE,
        )
        self.reactor.removeReader(self)
        self.reactor.callLater(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        if self.listening:
            self.reactor.addReader(self)

    def connectionLost(self, reason: Failure) -> None:
        self.stopListening()

    def logPrefix(self) -> str:
        return "l4router.listener"

    def getHost(self) -> address.IPv4Address | address.IPv6Address:
        host, port = self.socket.getsockname()[:2]
        return _tcp_address(host, port)


def listen_stream(
    reactor: Any, sock: socket.socket, factory: Any, shared: bool = False
) -> StreamPort:
    """Accept into Streams on a bound, listening TCP socket (`shared`: see StreamPort)."""
    sock.setblocking(False)
    port = StreamPort(reactor, sock, factory, shared)
    port.startListening()
    return port
