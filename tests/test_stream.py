"""l4router's own TCP transport (l4router.connection.stream), on real loopback sockets and the
reactor of ours turned by hand: what arrives, when the protocol hears of an end, and the
producer a full buffer pauses."""

import gc
import hashlib
import os
import resource
import select
import socket
import struct
import weakref

import pytest
from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from l4router.backends.outbound import OutboundConnection
from l4router.connection.stream import (
    READ_SIZE,
    SHARED_ACCEPTS_PER_EVENT,
    WRITE_BUFFER,
    Stream,
    listen_stream,
)
from tests.turned_reactor import CountingPoller, hand_turned, turn_until

RESET = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends a reset


class Recorder(Protocol):
    def __init__(self):
        self.data = b""
        self.lost = []  # the reasons connectionLost was called with

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost.append(reason)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    read_closed = write_closed = False

    def readConnectionLost(self):
        self.read_closed = True

    def writeConnectionLost(self):
        self.write_closed = True


class Producer:
    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


@pytest.fixture
def reactor():
    with hand_turned() as reactor:
        yield reactor


@pytest.fixture
def accept(reactor):
    """accept(kind) -> (protocol, its Stream, the plain client socket): a client accepted
    on a port of its own; the socket and the port are closed once the test ends."""
    opened = []

    def accept(kind=Recorder):
        protocol, stream, client, port = accepted(reactor, kind)
        opened.append((client, port))
        return protocol, stream, client

    try:
        yield accept
    finally:
        for client, port in opened:
            client.close()
            port.stopListening()


def listening(reactor, build):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return listen_stream(reactor, sock, build)


class Admitting(Factory):
    def __init__(self, kind=Recorder):
        self.kind = kind
        self.built = []

    def buildProtocol(self, addr):
        self.built.append(self.kind())
        return self.built[-1]


def accepted(reactor, kind=Recorder):
    """(the accepted protocol, its Stream, the plain client socket, the port)."""
    factory = Admitting(kind)
    port = listening(reactor, factory)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    turn_until(reactor, lambda: factory.built and factory.built[0].transport is not None)
    protocol = factory.built[0]
    return protocol, protocol.transport, client, port


def read_all(reactor, client, until_eof=True, limit=None):
    """What the client socket reads while the reactor turns, to its EOF (or `limit` bytes)."""
    client.setblocking(False)
    got = bytearray()
    for _ in range(5000):
        try:
            chunk = client.recv(1 << 20)
        except BlockingIOError:
            reactor.runUntilCurrent()
            reactor.doIteration(0.005)
            continue
        if not chunk and until_eof:
            return bytes(got)
        got += chunk
        if limit is not None and len(got) >= limit:
            return bytes(got)
    raise AssertionError(f"the client read {len(got)} bytes and no end")


def test_an_accepted_client_is_a_stream_read_and_written_at_once(reactor, accept):
    protocol, stream, client = accept()
    assert isinstance(stream, Stream)
    # No ioctl per connection: the socket stays blocking, yet a read with nothing there
    # returns (MSG_DONTWAIT) instead of hanging the process.
    assert stream.socket.getblocking()
    stream.doRead()
    assert protocol.data == b""
    client.sendall(b"hello")
    turn_until(reactor, lambda: protocol.data == b"hello")
    stream.write(b"at once")  # sent before any turn of the loop
    client.settimeout(2)
    assert client.recv(100) == b"at once"
    peer = stream.getPeer()
    assert (peer.host, peer.port) == client.getsockname()
    assert (stream.getHost().host, stream.getHost().port) == client.getpeername()


def test_a_full_socket_buffers_pauses_the_producer_and_resumes_it_once_drained(reactor, accept):
    protocol, stream, client = accept()
    producer = Producer()
    stream.registerProducer(producer, True)
    payload = os.urandom(8 << 20)  # far more than the socket buffers hold
    for offset in range(0, len(payload), 1 << 20):
        stream.write(payload[offset : offset + (1 << 20)])
    assert len(stream.pending) > WRITE_BUFFER
    assert producer.calls[0] == "pause"
    got = read_all(reactor, client, until_eof=False, limit=len(payload))
    turn_until(reactor, lambda: "resume" in producer.calls)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert not stream.pending


def test_losing_the_connection_flushes_first_then_reports_done_once(reactor, accept):
    protocol, stream, client = accept()
    payload = os.urandom(4 << 20)
    stream.write(payload)
    stream.loseConnection()
    assert stream.pending and not protocol.lost  # still sending
    got = read_all(reactor, client)  # everything, then the end
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    turn_until(reactor, lambda: protocol.lost)
    assert len(protocol.lost) == 1 and protocol.lost[0].check(error.ConnectionDone)


def test_with_nothing_buffered_losing_the_connection_closes_before_it_returns(reactor, accept):
    protocol, stream, client = accept()
    stream.loseConnection()
    assert len(protocol.lost) == 1 and protocol.lost[0].check(error.ConnectionDone)
    assert stream.fileno() == -1
    client.settimeout(2)
    assert client.recv(10) == b""


def test_a_half_close_sends_a_fin_and_the_stream_still_reads(reactor, accept):
    protocol, stream, client = accept(HalfCloseRecorder)
    stream.write(b"last words")
    stream.loseWriteConnection()
    assert protocol.write_closed
    client.settimeout(2)
    assert read_all(reactor, client) == b"last words"  # then the FIN
    client.sendall(b"an answer after the FIN")
    turn_until(reactor, lambda: protocol.data == b"an answer after the FIN")
    assert not protocol.lost


def test_the_peers_fin_is_a_half_close_for_a_protocol_that_takes_one(reactor, accept):
    protocol, stream, client = accept(HalfCloseRecorder)
    client.shutdown(socket.SHUT_WR)
    turn_until(reactor, lambda: protocol.read_closed)
    assert not protocol.lost
    stream.write(b"still open this way")
    client.settimeout(2)
    assert client.recv(100) == b"still open this way"


def test_the_peers_fin_ends_a_protocol_that_takes_no_half_close(reactor, accept):
    protocol, stream, client = accept()
    client.sendall(b"bye")
    client.shutdown(socket.SHUT_WR)
    turn_until(reactor, lambda: protocol.lost)
    assert protocol.data == b"bye"
    assert protocol.lost[0].check(error.ConnectionDone)


def test_an_abort_resets_at_once_and_is_reported_on_the_next_turn(reactor, accept):
    protocol, stream, client = accept()
    stream.write(b"x" * (4 << 20))  # dropped, not flushed
    stream.abortConnection()
    assert not protocol.lost
    turn_until(reactor, lambda: protocol.lost)
    assert protocol.lost[0].check(error.ConnectionAborted)
    client.settimeout(2)
    with pytest.raises(ConnectionResetError):
        while client.recv(1 << 20):
            pass


def test_a_reset_by_the_peer_ends_the_stream_as_lost(reactor, accept):
    protocol, stream, client = accept(HalfCloseRecorder)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    client.close()
    turn_until(reactor, lambda: protocol.lost)
    assert not protocol.lost[0].check(error.ConnectionDone)
    assert not protocol.read_closed


def test_a_client_the_factory_refuses_is_closed_unread(reactor):
    class Refusing(Factory):
        def buildProtocol(self, addr):
            return None

    port = listening(reactor, Refusing())
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        assert read_all(reactor, client) == b""
    finally:
        client.close()
        port.stopListening()


def test_a_stopped_port_accepts_no_more(reactor):
    factory = Admitting()
    port = listening(reactor, factory)
    number = port.getHost().port
    port.stopListening()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", number), timeout=2)


def test_an_outbound_connection_is_a_stream_once_connected(reactor):
    factory = Admitting()
    port = listening(reactor, factory)
    backend = Recorder()
    failures = []
    try:
        outbound = OutboundConnection(
            reactor, "127.0.0.1", port.getHost().port, backend, failures.append
        )
        turn_until(reactor, lambda: backend.transport is not None and factory.built)
        peer = outbound.getPeer()
        assert (peer.host, peer.port) == ("127.0.0.1", port.getHost().port)
        outbound.write(b"to the server")
        turn_until(reactor, lambda: factory.built[0].data == b"to the server")
        factory.built[0].transport.write(b"from the server")
        turn_until(reactor, lambda: backend.data == b"from the server")
        assert not failures
        outbound.loseConnection()
        assert backend.lost[0].check(error.ConnectionDone)
    finally:
        port.stopListening()


def test_a_refused_outbound_connect_fails_without_a_protocol(reactor):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    number = closed.getsockname()[1]
    closed.close()  # nothing listens there
    backend = Recorder()
    failures = []
    OutboundConnection(reactor, "127.0.0.1", number, backend, failures.append)
    turn_until(reactor, lambda: failures)
    assert failures[0].check(error.ConnectionRefusedError)
    assert backend.transport is None and not backend.lost


def test_a_protocol_that_raises_ends_its_stream_and_nothing_else(reactor, accept):
    class Raising(Recorder):
        def dataReceived(self, data):
            raise ValueError("a bug in a protocol")

    factory = Admitting(Raising)
    port = listening(reactor, factory)
    failing = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    healthy, stream, client = accept()
    try:
        failing.sendall(b"trigger")
        turn_until(reactor, lambda: factory.built and factory.built[0].lost)
        assert factory.built[0].lost[0].check(ValueError)
        assert read_all(reactor, failing) == b""  # closed
        client.sendall(b"unaffected")
        turn_until(reactor, lambda: healthy.data == b"unaffected")
    finally:
        failing.close()
        port.stopListening()


def test_an_ended_stream_and_its_protocol_are_freed_without_the_collector(reactor):
    """No reference cycle is left once a stream ends: the collector's pauses would show in
    the latency of every other connection, and its garbage in the memory."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        protocol, stream, client, port = accepted(reactor)
        client.close()
        lost = protocol.lost
        turn_until(reactor, lambda: lost)
        port.stopListening()
        port.factory.built.clear()
        left = [weakref.ref(protocol), weakref.ref(stream)]
        del protocol, stream
        reactor.doIteration(0)  # the reactor forgets a closed socket's registration
        assert [ref() for ref in left] == [None, None]
    finally:
        if collecting:
            gc.enable()


def test_a_port_every_worker_shares_takes_a_few_clients_at_a_time_and_leaves_epoll_first():
    """A listening socket shared by the workers: a few clients taken per wake-up (the rest
    are left to an idle worker), and out of this process's epoll before its descriptor
    closes (other processes still hold the socket: a registration left behind would go on
    waking a worker that stopped accepting)."""

    class UnregisterChecking(CountingPoller):
        def unregister(self, fd):
            self.poller.unregister(fd)  # raises if the descriptor was closed already
            self.calls.append(("del", fd))

    with hand_turned(UnregisterChecking) as reactor:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        factory = Admitting()
        port = listen_stream(reactor, sock, factory, shared=True)
        fd = port.fileno()
        clients = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(10)]
        try:
            reactor.doIteration(0.5)
            assert len(factory.built) == SHARED_ACCEPTS_PER_EVENT
            turn_until(reactor, lambda: len(factory.built) == 10)
            port.stopListening()
            assert ("del", fd) in reactor._poller.calls  # made while the descriptor was open
            assert port.socket.fileno() == -1
        finally:
            for client in clients:
                client.close()


def test_out_of_descriptors_a_port_pauses_then_accepts_the_clients_that_waited(reactor):
    """EMFILE leaves the clients queued: the port stops reading for ACCEPT_PAUSE (instead of
    spinning on a socket that stays readable) and takes them once descriptors are back."""
    factory = Admitting()
    port = listening(reactor, factory)
    clients = [socket.create_connection(port.socket.getsockname(), timeout=5) for _ in range(3)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        try:
            while True:  # every number below the limit taken: none left to accept into
                try:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
            reactor.doIteration(0.5)
            assert not factory.built
            assert port.fileno() not in reactor._reads  # paused, not spinning
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        turn_until(reactor, lambda: len(factory.built) == 3)
    finally:
        for fd in fillers:
            os.close(fd)
        for client in clients:
            client.close()
        port.stopListening()


def test_a_reset_ends_a_stream_that_is_not_reading_at_once(reactor, accept):
    """On our reactor a Stream stays registered while paused: the reset's event ends it (the
    relay must hear that its peer is gone), and it is reported once."""
    protocol, stream, client = accept()
    stream.pauseProducing()
    client.sendall(b"unread")
    for _ in range(3):
        reactor.doIteration(0.01)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    client.close()
    turn_until(reactor, lambda: protocol.lost)
    stream.write(b"to nobody")
    for _ in range(3):
        reactor.doIteration(0.01)
    assert len(protocol.lost) == 1 and protocol.lost[0].check(error.ConnectionLost)
    assert protocol.data == b""


def test_a_write_to_a_peer_that_reset_ends_a_stream_that_is_not_reading():
    """On Twisted's reactor a paused Stream is not registered, so no event reports the reset:
    the failure a send finds ends it."""
    with hand_turned(kind=EPollReactor) as reactor:
        protocol, stream, client, port = accepted(reactor)
        try:
            stream.pauseProducing()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            client.close()  # a reset, which no event reports now
            for _ in range(3):
                reactor.doIteration(0.01)
            assert not protocol.lost
            stream.write(b"to nobody")
            stream.write(b"more to nobody")
            turn_until(reactor, lambda: protocol.lost)
            assert len(protocol.lost) == 1 and protocol.lost[0].check(error.ConnectionLost)
        finally:
            client.close()
            port.stopListening()


# Edge-triggered on our reactor: one registration for a stream's whole life, and no event lost


def registrations(reactor, fd):
    return [call for call in reactor._poller.calls if call[1] == fd]


EDGES = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET


def test_a_stream_is_registered_once_for_its_whole_life():
    """Reading, writing, a pause and a resume, a half-close each way and the close: one
    epoll_ctl, the first."""
    with hand_turned(CountingPoller) as reactor:
        protocol, stream, client, port = accepted(reactor, HalfCloseRecorder)
        fd = stream.fileno()
        try:
            client.sendall(b"ping")
            turn_until(reactor, lambda: protocol.data == b"ping")
            stream.write(b"pong")
            client.settimeout(2)
            assert client.recv(10) == b"pong"
            stream.pauseProducing()
            client.sendall(b"while paused")
            for _ in range(3):
                reactor.doIteration(0.01)
            stream.resumeProducing()
            turn_until(reactor, lambda: protocol.data == b"pingwhile paused")
            stream.loseWriteConnection()
            assert client.recv(10) == b""
            client.shutdown(socket.SHUT_WR)
            turn_until(reactor, lambda: protocol.read_closed)
            stream.loseConnection()
            assert protocol.lost
            assert registrations(reactor, fd) == [("add", fd, EDGES)]
        finally:
            client.close()
            port.stopListening()


def epoll_events(reactor, fd):
    """What the kernel's epoll set of `reactor` asks for `fd` (its fdinfo, without the
    EPOLLERR and EPOLLHUP every registration gets), or None."""
    with open(f"/proc/self/fdinfo/{reactor._poller.fileno()}") as info:
        for line in info:
            fields = line.split()
            if fields[:1] == ["tfd:"] and int(fields[1]) == fd:
                return int(fields[3], 16) & ~(select.EPOLLERR | select.EPOLLHUP)
    return None


def test_a_stream_is_in_epoll_as_soon_as_it_is_made_and_out_once_closed(reactor):
    """Its one registration is made at once, not at the end of the turn; asking for
    writability keeps what it reads for."""
    ours, theirs = socket.socketpair()
    try:
        stream = Stream(reactor, ours, Recorder())
        fd = stream.fileno()
        assert epoll_events(reactor, fd) == EDGES
        stream.start()
        stream.write(b"x" * (8 << 20))  # more than the socket takes: it has to wait
        assert epoll_events(reactor, fd) == EDGES | select.EPOLLOUT
        stream.abortConnection()
        reactor.runUntilCurrent()
        reactor.doIteration(0)
        assert epoll_events(reactor, fd) is None
    finally:
        ours.close()
        theirs.close()


def test_bytes_that_came_while_paused_are_read_on_resuming_with_no_new_event(reactor, accept):
    protocol, stream, client = accept()
    stream.pauseProducing()
    client.sendall(b"early")
    for _ in range(3):  # the only event for these bytes comes now, while paused
        reactor.doIteration(0.01)
    assert protocol.data == b""
    stream.resumeProducing()
    assert protocol.data == b""  # read on the next turn, not inside resumeProducing
    reactor.doIteration(0)
    assert protocol.data == b"early"


def test_bytes_and_the_fin_that_came_together_are_both_read(reactor, accept):
    """A short read usually means nothing is left, but not when the peer's FIN came with the
    bytes (an answer and its close): no later event would announce that end."""
    protocol, stream, client = accept(HalfCloseRecorder)
    reads = CountingReads(stream)
    client.sendall(b"the answer")
    client.shutdown(socket.SHUT_WR)
    turn_until(reactor, lambda: protocol.read_closed)
    assert protocol.data == b"the answer"
    assert reads.count == 1  # the FIN was reported with the bytes: no read to learn the end


class CountingReads:
    """Wraps a Stream's socket to count its recv calls."""

    def __init__(self, stream):
        self.count = 0
        self.sock = stream.socket
        stream.socket = self

    def recv(self, *args):
        self.count += 1
        return self.sock.recv(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_bytes_then_a_reset_are_read_to_the_reset(reactor, accept):
    """A peer that resets after sending: its bytes are read, then the error, not an end."""
    protocol, stream, client = accept(HalfCloseRecorder)
    client.sendall(b"then a reset")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    client.close()
    turn_until(reactor, lambda: protocol.lost)
    assert protocol.data == b"then a reset"
    assert not protocol.lost[0].check(error.ConnectionDone)
    assert not protocol.read_closed


def test_more_than_a_read_is_read_a_read_per_turn_and_other_streams_are_served_between(
    reactor, accept
):
    busy, busy_stream, busy_client = accept()
    quiet, _, quiet_client = accept()
    payload = os.urandom(READ_SIZE * 4)
    busy_client.sendall(payload)
    quiet_client.sendall(b"me too")
    reactor.doIteration(0.01)
    assert len(busy.data) == READ_SIZE  # the rest waits for the next turn
    assert quiet.data == b"me too"
    turn_until(reactor, lambda: len(busy.data) == len(payload))
    assert hashlib.sha256(busy.data).digest() == hashlib.sha256(payload).digest()


def test_an_accepted_stream_asks_for_writability_once_it_has_to_wait_and_only_once():
    with hand_turned(CountingPoller) as reactor:
        protocol, stream, client, port = accepted(reactor)
        fd = stream.fileno()
        reactor.doIteration(0)  # registered
        try:
            for _ in range(2):
                payload = os.urandom(8 << 20)
                stream.write(payload)
                assert stream.pending
                got = read_all(reactor, client, until_eof=False, limit=len(payload))
                assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
                turn_until(reactor, lambda: not stream.pending)
            assert registrations(reactor, fd) == [
                ("add", fd, EDGES),
                ("mod", fd, EDGES | select.EPOLLOUT),
            ]
        finally:
            client.close()
            port.stopListening()


def test_a_reset_after_the_peers_fin_ends_the_stream_as_done(reactor, accept):
    """A server that closes without reading the request sends its FIN, then a reset for the
    bytes it left unread: that is a close, not a connection lost (the relay's reason, and
    passive health, would blame the server for a reset)."""
    protocol, stream, client = accept(HalfCloseRecorder)
    client.shutdown(socket.SHUT_WR)
    turn_until(reactor, lambda: protocol.read_closed)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    client.close()
    turn_until(reactor, lambda: protocol.lost)
    assert protocol.lost[0].check(error.ConnectionDone)


def test_a_paused_stream_whose_peer_closed_both_ways_reads_what_was_left_on_resuming(
    reactor, accept
):
    """Both FINs exchanged while the relay's other side was full and this side paused: the
    hang-up comes with bytes unread, which must reach the protocol (then the end), not be
    dropped with the socket."""
    protocol, stream, client = accept(HalfCloseRecorder)
    stream.pauseProducing()
    payload = os.urandom(100_000)
    client.sendall(payload)
    stream.loseWriteConnection()
    client.shutdown(socket.SHUT_WR)
    for _ in range(5):  # the hang-up's event comes now, while paused
        reactor.doIteration(0.01)
    assert not protocol.lost and not protocol.read_closed
    stream.resumeProducing()
    turn_until(reactor, lambda: protocol.read_closed)
    assert hashlib.sha256(protocol.data).digest() == hashlib.sha256(payload).digest()
