"""The zero-copy relay (Linux): once the peeked bytes are replayed, bytes move socket -> pipe
-> socket with splice(2) and never enter Python.

It keeps what the copying relay keeps: backpressure (a direction stops reading while its pipe
cannot be emptied into the other socket), half-close (EOF on one side is a shutdown of the
other's write side once the pipe is drained), the idle timeout and the byte counts (the same
`received` attributes the Relay's idle check reads), and one close reason. At the end the
sockets go back to their Twisted transports, which close them.
"""

import errno
import fcntl
import os
import socket

from l4router.connection.reasons import Reason

AVAILABLE = hasattr(os, "splice")
# A pipe's default 64 KiB caps a splice at 64 KiB; with 256 KiB one stream moves 1.6x more
# (bench/run.py, bulk_1_gbps). A pipe holds it only while bytes are in flight.
PIPE_SIZE = 1 << 18
CHUNK = PIPE_SIZE
FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class PipePool:
    """Pipes lent to directions only while bytes are in flight. A pipe is taken when a source
    is readable and given back once emptied into the sink, so an idle relay holds none and a
    busy process reuses a few: only a direction held up by a slow sink keeps one."""

    def __init__(self, keep=16):
        self.keep = keep  # empty pipes kept for reuse; more are closed
        self.free = []

    def take(self):
        """An empty pipe (read fd, write fd); OSError when no descriptor is left."""
        if self.free:
            return self.free.pop()
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above the system's pipe-max-size: the default size still works
            pass
        return pipe

    def give_back(self, pipe):
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            _close_pipe(pipe)


def _close_pipe(pipe):
    for fd in pipe:
        try:
            os.close(fd)
        except OSError:
            pass


PIPES = PipePool()


class _Direction:
    """Bytes from one socket to the other through a pipe (borrowed while bytes are in it)."""

    __slots__ = ("source", "sink", "side", "pipe", "in_pipe", "pending", "eof", "finished")

    def __init__(self, source, sink, side):
        self.source = source  # _Socket
        self.sink = sink  # _Socket
        self.side = side  # the protocol whose `received` counts these bytes
        self.pipe = None  # (read fd, write fd) while bytes are in flight
        self.in_pipe = 0
        self.pending = b""  # bytes copied through Python when no pipe could be had
        self.eof = False
        self.finished = False  # EOF seen and passed on

    def release_pipe(self):
        """Give the pipe back if it is empty; close it if bytes were left in it."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        if self.in_pipe:
            _close_pipe(pipe)
        else:
            PIPES.give_back(pipe)


class _Socket:
    """One relayed socket: its transport stays registered with the reactor, but while the
    relay runs its readable event feeds `outgoing` and its writable event drains `incoming`
    (the relay sets the transport's doRead and doWrite, so taking over and handing back cost
    no epoll call)."""

    __slots__ = ("relay", "transport", "fd", "outgoing", "incoming")

    def __init__(self, relay, transport):
        self.relay = relay
        self.transport = transport
        self.fd = transport.fileno()
        self.outgoing = None
        self.incoming = None

    def take_over(self):
        transport = self.transport
        prepare = getattr(transport, "prepare_for_splice", None)
        if prepare is not None:  # a Stream: non-blocking, level-triggered
            prepare()
        transport.doRead = self.readable
        transport.doWrite = self.writable
        transport.stopWriting()  # nothing is buffered in it
        transport.startReading()

    def readable(self):
        return self.relay.pump(self.outgoing)

    def writable(self):
        return self.relay.drain(self.incoming)

    def hand_back(self):
        """The transport's own doRead and doWrite again, so that it can close itself."""
        transport = self.transport
        transport.stopReading()
        transport.stopWriting()
        for name in ("doRead", "doWrite"):
            transport.__dict__.pop(name, None)
        self.relay = None  # no cycle left for the collector to find


class SpliceRelay:  # provides relay.IRelay (declared there: relay.py imports this module)
    """Takes over a client protocol and a BackendSide whose transports have nothing buffered.

    Pipes come from PIPES while bytes are in flight; when none can be had (out of
    descriptors), a chunk is copied through Python instead (waiting for a pipe could
    deadlock: the one that frees it may be waiting for ours).
    """

    # Five small objects per relay: slots keep an idle relay's memory below HAProxy's.
    __slots__ = ("idle", "client", "backend", "on_end", "reason", "ended", "sockets", "up", "down")

    def __init__(self, client, backend, idle, on_end):
        client.relay = backend.relay = self
        self.idle = idle  # an IdleSweeper
        self.client = client
        self.backend = backend
        self.on_end = on_end
        self.reason = None
        self.ended = False
        client_socket = _Socket(self, client.transport)
        backend_socket = _Socket(self, backend.transport)
        self.sockets = (client_socket, backend_socket)
        self.up = _Direction(client_socket, backend_socket, client)
        self.down = _Direction(backend_socket, client_socket, backend)
        client_socket.outgoing, client_socket.incoming = self.up, self.down
        backend_socket.outgoing, backend_socket.incoming = self.down, self.up

    def activity(self):
        return self.client.received, self.backend.received

    def idled(self):
        self.close(Reason.IDLE_TIMEOUT, abort=True)

    def start(self, replay, client_finished_sending):
        """Take the sockets over from a copying relay's hand-over, which has replayed
        everything already (`replay` is empty)."""
        if replay:
            raise ValueError("the splice relay starts with nothing to replay")
        for sock in self.sockets:
            sock.take_over()
        if client_finished_sending:
            self.up.eof = True
            self.up.source.transport.stopReading()
            self._finish(self.up)
        self.idle.watch(self)

    def forward(self, side, data):
        """Bytes its side read through its transport rather than the pump: sent on like a
        chunk copied when no pipe could be had."""
        direction = self.up if side is self.client else self.down
        direction.pending += data
        side.received += len(data)
        self.drain(direction)

    def side_finished_sending(self, side):
        """Its side's FIN seen through its transport rather than the pump."""
        self._source_ended(self.up if side is self.client else self.down)

    # The pump

    def pump(self, direction):
        if direction.eof:
            direction.source.transport.stopReading()
            return None
        if direction.pipe is None:
            try:
                direction.pipe = PIPES.take()
            except OSError:  # out of descriptors: this chunk goes through Python instead
                return self._copy(direction)
        try:
            moved = os.splice(direction.source.fd, direction.pipe[1], CHUNK, flags=FLAGS)
        except OSError as error:
            if error.errno in _AGAIN:
                direction.release_pipe()
                return None
            return self._reset(direction.source)
        if moved == 0:
            direction.release_pipe()
            return self._source_ended(direction)
        direction.in_pipe += moved
        direction.side.received += moved
        return self.drain(direction)

    def _copy(self, direction):
        try:
            data = os.read(direction.source.fd, CHUNK)
        except OSError as error:
            return None if error.errno in _AGAIN else self._reset(direction.source)
        if not data:
            return self._source_ended(direction)
        direction.pending = data
        direction.side.received += len(data)
        return self.drain(direction)

    def _source_ended(self, direction):
        direction.eof = True
        direction.source.transport.stopReading()
        if not direction.in_pipe and not direction.pending:
            self._finish(direction)
        return None

    def drain(self, direction):
        """Empty what is in flight into the sink; while the sink is full, stop reading the
        source and wait for the sink to be writable (backpressure)."""
        try:
            while direction.pending:
                direction.pending = direction.pending[
                    os.write(direction.sink.fd, direction.pending) :
                ]
            while direction.in_pipe:
                direction.in_pipe -= os.splice(
                    direction.pipe[0], direction.sink.fd, direction.in_pipe, flags=FLAGS
                )
        except OSError as error:
            if error.errno not in _AGAIN:
                return self._reset(direction.sink)
            direction.source.transport.stopReading()
            direction.sink.transport.startWriting()
            return None
        direction.release_pipe()
        direction.sink.transport.stopWriting()
        if direction.eof:
            self._finish(direction)
        elif not self.ended:
            direction.source.transport.startReading()
        return None

    def _finish(self, direction):
        """EOF from the source and nothing left in the pipe: half-close the sink."""
        if direction.finished:
            return
        direction.finished = True
        try:
            direction.sink.transport.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.up.finished and self.down.finished:
            self.close(Reason.COMPLETED)

    # Ending

    def _reset(self, sock):
        reason = Reason.CLIENT_RESET if sock is self.sockets[0] else Reason.BACKEND_RESET
        self.close(reason, abort=True)
        return None

    def side_lost(self, side, reason):
        """A transport lost (the reactor saw an error on its socket), or closing after
        `close` handed it back (nothing left to do then)."""
        if not self.ended:
            self._reset(self.sockets[0] if side is self.client else self.sockets[1])

    def close(self, reason, abort=False):
        if self.ended:
            return
        self.ended = True
        if self.reason is None:
            self.reason = reason
        self.idle.unwatch(self)
        for sock in self.sockets:
            sock.hand_back()
        for direction in (self.up, self.down):
            direction.release_pipe()
        self.backend.relay = None
        for side in (self.client, self.backend):
            if abort:
                side.transport.abortConnection()
            else:
                side.transport.loseConnection()
        self.on_end(self.reason)
