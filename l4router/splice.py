"""The zero-copy relay (Linux): once the peeked bytes are replayed, bytes move socket -> pipe
-> socket with splice(2) and never enter Python.

It keeps what the copying relay keeps: backpressure (a direction stops reading while its pipe
cannot be emptied into the other socket), half-close (EOF on one side is a shutdown of the
other's write side once the pipe is drained), the idle timeout and the byte counts (the same
`received` attributes the Relay's idle check reads), and one close reason. At the end the
sockets go back to their Twisted transports, which close them.
"""

import errno
import os
import socket

from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from zope.interface import implementer

from l4router.relay import BACKEND_RESET, CLIENT_RESET, COMPLETED, IDLE_TIMEOUT, IdleWatch

AVAILABLE = hasattr(os, "splice")
CHUNK = 1 << 16
FLAGS = (getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0))
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class _Direction:
    """Bytes from one socket to the other through a pipe."""

    def __init__(self, source, sink, side):
        self.source = source  # _Socket
        self.sink = sink  # _Socket
        self.side = side  # the protocol whose `received` counts these bytes
        self.pipe_read, self.pipe_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.in_pipe = 0
        self.eof = False
        self.finished = False  # EOF seen and passed on

    def close(self):
        for fd in (self.pipe_read, self.pipe_write):
            try:
                os.close(fd)
            except OSError:
                pass


@implementer(IReadDescriptor, IWriteDescriptor)
class _Socket:
    """One relayed socket as the reactor sees it: readable feeds `outgoing`, writable drains
    `incoming`."""

    def __init__(self, relay, transport):
        self.relay = relay
        self.transport = transport
        self.fd = transport.fileno()
        self.outgoing = None
        self.incoming = None

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return "SpliceRelay"

    def doRead(self):
        return self.relay.pump(self.outgoing)

    def doWrite(self):
        return self.relay.drain(self.incoming)

    def connectionLost(self, reason):
        self.relay.failed(self, reason)


class SpliceRelay:
    """Takes over a client protocol and a BackendSide whose transports have nothing buffered.

    It costs four descriptors (two pipes) per connection on top of the two sockets; when they
    cannot be had, the constructor raises OSError and the caller copies instead.
    """

    def __init__(self, reactor, client, backend, idle_timeout, on_end):
        self.reactor = reactor
        self.client = client
        self.backend = backend
        self.on_end = on_end
        self.reason = None
        self.ended = False
        client_socket = _Socket(self, client.transport)
        backend_socket = _Socket(self, backend.transport)
        self.sockets = (client_socket, backend_socket)
        self.up = _Direction(client_socket, backend_socket, client)
        try:
            self.down = _Direction(backend_socket, client_socket, backend)
        except OSError:
            self.up.close()
            raise
        client_socket.outgoing, client_socket.incoming = self.up, self.down
        backend_socket.outgoing, backend_socket.incoming = self.down, self.up
        self.idle = IdleWatch(reactor, idle_timeout,
                              lambda: (client.received, backend.received),
                              lambda: self.close(IDLE_TIMEOUT, abort=True))

    def start(self, client_finished_sending):
        for side in (self.client, self.backend):
            side.transport.stopReading()
            side.transport.stopWriting()
        if client_finished_sending:
            self.up.eof = True
            self._finish(self.up)
        for sock in self.sockets:
            self.reactor.addReader(sock)
        self.idle.start()

    # The pump

    def pump(self, direction):
        if direction.eof:
            self.reactor.removeReader(direction.source)
            return None
        try:
            moved = os.splice(direction.source.fd, direction.pipe_write, CHUNK, flags=FLAGS)
        except OSError as error:
            if error.errno in _AGAIN:
                return None
            return self._reset(direction.source)
        if moved == 0:
            direction.eof = True
            self.reactor.removeReader(direction.source)
            if direction.in_pipe == 0:
                self._finish(direction)
            return None
        direction.in_pipe += moved
        direction.side.received += moved
        return self.drain(direction)

    def drain(self, direction):
        while direction.in_pipe:
            try:
                moved = os.splice(direction.pipe_read, direction.sink.fd, direction.in_pipe,
                                  flags=FLAGS)
            except OSError as error:
                if error.errno in _AGAIN:
                    # The sink is full: stop reading the source until it drains (backpressure).
                    self.reactor.removeReader(direction.source)
                    self.reactor.addWriter(direction.sink)
                    return None
                return self._reset(direction.sink)
            direction.in_pipe -= moved
        self.reactor.removeWriter(direction.sink)
        if direction.eof:
            self._finish(direction)
        elif not self.ended:
            self.reactor.addReader(direction.source)
        return None

    def _finish(self, direction):
        """EOF from the source and nothing left in the pipe: half-close the sink."""
        if direction.finished:
            return
        direction.finished = True
        try:
            _shutdown_write(direction.sink.fd)
        except OSError:
            pass
        if self.up.finished and self.down.finished:
            self.close(COMPLETED)

    # Ending

    def _reset(self, sock):
        reason = CLIENT_RESET if sock is self.sockets[0] else BACKEND_RESET
        self.close(reason, abort=True)
        return None

    def failed(self, sock, reason):
        self._reset(sock)

    def side_lost(self, side, reason):
        """A transport closing after `close` handed it back: nothing left to do."""

    def close(self, reason, abort=False):
        if self.ended:
            return
        self.ended = True
        if self.reason is None:
            self.reason = reason
        self.idle.stop()
        for sock in self.sockets:
            self.reactor.removeReader(sock)
            self.reactor.removeWriter(sock)
        for direction in (self.up, self.down):
            direction.close()
        self.backend.relay = None
        for side in (self.client, self.backend):
            if abort:
                side.transport.abortConnection()
            else:
                side.transport.loseConnection()
        self.on_end(self.reason)


def _shutdown_write(fd):
    """shutdown(fd, SHUT_WR) on a descriptor the transport still owns (dup: closing the copy
    leaves the original open)."""
    copy = socket.socket(fileno=os.dup(fd))
    try:
        copy.shutdown(socket.SHUT_WR)
    finally:
        copy.close()
