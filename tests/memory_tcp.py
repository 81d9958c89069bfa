"""For the in-memory tests: TCP transports and connects without sockets."""

from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure


class RecordedConnect:
    """A client's connect to a server (BackendGroup.open_connection) recorded in the
    MemoryReactor's `tcpClients`, as connectTCP's are, instead of a real socket. The test
    answers it like a connectTCP factory (`buildProtocol` then `makeConnection`, or
    `clientConnectionFailed`)."""

    def __init__(self, reactor, host, port, protocol, failed, source=None):
        self.protocol = protocol
        self.failed = failed
        reactor.tcpClients.append((host, port, self, None, source))

    def buildProtocol(self, addr):
        return self.protocol

    def clientConnectionFailed(self, connector, reason):
        self.failed(reason)

    def fail(self, exc):
        self.failed(Failure(exc))

    def stop(self):
        self.fail(error.UserError())


class TCPTransport(StringTransport):
    """StringTransport plus the TCP-only calls the router makes."""

    write_closed = False
    aborted = False

    def fileno(self):
        return -1

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()
