"""The reactor of ours, driven turn by turn on real loopback sockets: what it registers with
epoll, and that no change of interest loses an event."""

import select
import socket

import pytest
from twisted.internet.protocol import Factory, Protocol

from tests.turned_reactor import CountingPoller, hand_turned, turn_until


class Recorder(Protocol):
    def __init__(self):
        self.data = b""
        self.lost = False

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


@pytest.fixture
def reactor():
    with hand_turned(CountingPoller) as reactor:
        yield reactor


def connected_pair(reactor):
    """(server protocol, its transport, a plain client socket)."""
    accepted = []

    class Accepting(Factory):
        def buildProtocol(self, addr):
            accepted.append(Recorder())
            return accepted[-1]

    port = reactor.listenTCP(0, Accepting(), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    turn_until(reactor, lambda: accepted and accepted[0].transport is not None)
    return accepted[0], accepted[0].transport, client, port


def registrations_for(reactor, fd):
    return [call for call in reactor._poller.calls if call[1] == fd]


def test_a_pause_and_a_resume_cost_no_epoll_call_and_lose_no_bytes(reactor):
    server, transport, client, _ = connected_pair(reactor)
    fd = transport.fileno()
    try:
        transport.pauseProducing()
        client.sendall(b"while paused")
        for _ in range(3):  # readable while paused: the lazy registration is dropped
            reactor.doIteration(0.01)
        assert server.data == b""
        assert registrations_for(reactor, fd)[-1] == ("del", fd)
        transport.resumeProducing()
        turn_until(reactor, lambda: server.data == b"while paused")
        # A pause and resume with nothing arriving meanwhile: no call at all.
        calls = len(reactor._poller.calls)
        transport.pauseProducing()
        reactor.doIteration(0)
        transport.resumeProducing()
        client.sendall(b"!")
        turn_until(reactor, lambda: server.data.endswith(b"!"))
        assert len(reactor._poller.calls) == calls
    finally:
        client.close()


def test_read_and_write_interest_changed_in_one_turn_make_one_call(reactor):
    server, transport, client, _ = connected_pair(reactor)
    fd = transport.fileno()
    try:
        reactor.doIteration(0)  # registered for reading
        before = len(registrations_for(reactor, fd))
        transport.stopReading()
        transport.startWriting()
        transport.startReading()
        reactor.doIteration(0)
        assert registrations_for(reactor, fd)[before:] == [
            ("mod", fd, select.EPOLLIN | select.EPOLLOUT)
        ]
    finally:
        client.close()


def test_a_closed_connection_is_not_unregistered_and_its_number_can_be_reused(reactor):
    server, transport, client, port = connected_pair(reactor)
    fd = transport.fileno()
    client.close()
    turn_until(reactor, lambda: server.lost)
    assert ("del", fd) not in reactor._poller.calls  # closing removed it from epoll
    second, transport2, client2, _ = connected_pair(reactor)
    try:
        client2.sendall(b"next")
        turn_until(reactor, lambda: second.data == b"next")  # registered afresh
    finally:
        client2.close()


def test_a_listening_port_is_unregistered_when_it_stops(reactor):
    _, _, client, port = connected_pair(reactor)
    fd = port.fileno()
    client.close()
    port.stopListening()
    turn_until(reactor, lambda: ("del", fd) in reactor._poller.calls)


def test_a_regular_file_is_polled_continuously_as_twisted_does(reactor, tmp_path):
    """epoll refuses regular files (EPERM): they are read by polling, not lost."""
    from twisted.internet.abstract import FileDescriptor

    path = tmp_path / "data"
    path.write_bytes(b"x")
    read = []

    class FileReader(FileDescriptor):
        def __init__(self, stream):
            super().__init__(reactor)
            self.stream = stream

        def fileno(self):
            return self.stream.fileno()

        def doRead(self):
            read.append(self.stream.read())

    with open(path, "rb") as stream:
        reader = FileReader(stream)
        reader.startReading()
        turn_until(reactor, lambda: read)
        assert read[0] == b"x"
        assert reactor._continuousPolling.isReading(reader)
        reader.stopReading()
