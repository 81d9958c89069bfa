"""Every place l4router reaches into Twisted's private names, and why (the reactor of ours,
l4router.process.reactor, subclasses Twisted's epoll reactor and is the other one).

Each is checked by the tests that drive the real router; a Twisted upgrade that renames one
fails them, rather than silently costing system calls.
"""

import socket

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

# Relaying: Twisted's transport buffers every write and toggles epoll registrations around
# it; a proxy that sends at once when nothing is buffered saves two epoll_ctl and a loop turn
# per chunk, and a FIN or a close without the registrations Twisted makes first.


# l4router's own Streams (l4router.connection.stream) send at once, pass a FIN on and close
# as these helpers do for Twisted's transports: for them each helper is the plain method.


def sends_at_once(transport):
    """A Stream: a write is sent now (or buffered by the stream itself), not next turn."""
    return getattr(transport, "sends_at_once", False)


def buffered(transport):
    """Bytes a Twisted transport holds for its socket (its private write buffers)."""
    if sends_at_once(transport):
        return len(transport.pending)
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:  # not a FileDescriptor (an in-memory transport): nothing held
        return 0


def half_close(transport):
    """Pass a FIN on: shutdown(SHUT_WR) now when nothing is buffered. Twisted's
    loseWriteConnection would register for writability, send nothing, shut down and
    unregister: three more system calls."""
    sock = getattr(transport, "socket", None)
    if sock is None or sends_at_once(transport) or buffered(transport):
        transport.loseWriteConnection()
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the peer is gone: the transport finds out as it reads
        pass
    transport._writeDisconnected = True  # the state its own half-close ends in


def close_flushed(transport):
    """Close a transport whose peer has said all it had: when nothing is buffered, at once
    and with close() alone. Twisted's loseConnection would first register for writability
    and send nothing, then shutdown(2) before close() (which its own comment calls
    unnecessary for a socket no other process holds)."""
    if sends_at_once(transport):
        transport.loseConnection()
        return
    if getattr(transport, "socket", None) is not None and not buffered(transport):
        transport._writeDisconnected = True  # nothing to flush: loseConnection closes now
        transport._shouldShutdown = False
    transport.loseConnection()


def write_now(transport, data):
    """Write `data` to a Twisted TCP transport, sending at once what the socket takes.

    `transport.write` only buffers: it registers for writability (an epoll_ctl), sends on the
    next turn of the loop and unregisters (another): two system calls and a loop turn per
    relayed chunk. When nothing is buffered (order is kept), the socket gets the bytes now;
    only what it does not take goes through the transport, which also finds any error.
    """
    if sends_at_once(transport):
        transport.write(data)
        return
    sock = getattr(transport, "socket", None)
    if (
        sock is not None
        and transport.connected
        and not transport.disconnecting
        and not buffered(transport)
    ):
        try:
            data = data[sock.send(data) :]
        except OSError:  # full (EAGAIN) or failing: the transport deals with it
            pass
    if data:
        transport.write(data)


# Stopping: twistd re-raises the signal that stopped the reactor, from a private attribute.


def exit_zero_after_orderly_stop(reactor):
    """twistd re-raises the SIGTERM/SIGINT that stopped the reactor, so the exit status would
    say "killed". The shutdown was orderly and complete: exit 0, as documented."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


# Endpoint strings: the parsed address of a TCP server endpoint, and the built-in endpoint
# types, which Twisted keeps without a public accessor.


def endpoint_address(endpoint):
    """(interface, port, backlog) of a TCP server endpoint made by serverFromString."""
    return endpoint._interface, endpoint._port, endpoint._backlog


def builtin_endpoint_types():
    """The endpoint type names Twisted itself parses (plugins add more)."""
    from twisted.internet.endpoints import _serverParsers

    return tuple(_serverParsers)


# Workers (l4router.process.forkserver): twistd's option parser finds its subcommands by
# walking every plugin cache, which in a forked worker copies pages it shares with the fork
# server (it reads, so it writes reference counts).


def only_these_service_makers(makers):
    """From now on twistd's ServerOptions offers `makers` as its subcommands (the ones the
    supervisor found), without looking for plugins again."""
    from twisted.scripts._twistd_unix import ServerOptions

    def find(interface, package=None):
        return makers if interface is IServiceMaker else getPlugins(interface, package)

    ServerOptions._getPlugins = staticmethod(find)
