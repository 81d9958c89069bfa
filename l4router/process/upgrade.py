"""Upgrades without a refused connection (`upgrade_socket: PATH`).

A running l4router listens on a UNIX socket only its own user can open. A new process started
with the same config (after `pip install -U l4router`, say) connects to it before it binds
anything and asks for the listening sockets; the running process sends them (SCM_RIGHTS) and
goes on accepting. The new process adopts them instead of binding, starts, and says it is
ready; then the old one stops accepting and drains its relays as at shutdown (up to
`shutdown_timeout`) and exits. The kernel keeps every listening socket open throughout, so no
connection is refused, and those queued meanwhile are accepted by whichever process is first.
As HAProxy's `-x` and Envoy's hot restart do.

`unix:` and `systemd:` listen addresses are not handed over (the new process binds them).
"""

from __future__ import annotations

import json
import os
import socket
import struct

from twisted.application.service import Service
from twisted.internet import abstract, error
from twisted.logger import Logger

log = Logger()

TAKEOVER, READY = b"TAKEOVER\n", b"READY\n"
MAX_FDS = 253  # what one SCM_RIGHTS message carries on Linux
ASK_TIMEOUT = 5.0


class Takeover:
    """The new process's side: the sockets it was handed, and the line it owes when ready."""

    def __init__(self, channel: socket.socket, sockets: dict[str, list[int]]):
        self.channel = channel
        self.sockets = sockets  # listen description -> fds, one per worker of the old process

    def close_unused(self, wanted) -> None:
        """Close what the new config does not listen on (else it would queue clients that
        nobody accepts)."""
        for description in [d for d in self.sockets if d not in wanted]:
            for fd in self.sockets.pop(description):
                os.close(fd)

    def take(self, descriptions) -> dict[str, int]:
        """{description: fd} of these, removed from what is left to take."""
        taken = {}
        for description in descriptions:
            fds = self.sockets.pop(description, None)
            if fds:
                taken[description] = fds[0]
                for fd in fds[1:]:
                    os.close(fd)
        return taken

    def first_of_each(self) -> dict[str, int]:
        """{description: fd} for a single process; the other workers' sockets are closed."""
        chosen = {}
        for description, fds in self.sockets.items():
            chosen[description] = fds[0]
            for fd in fds[1:]:
                os.close(fd)
        return chosen

    def ready(self) -> None:
        """Tell the old process this one accepts: it stops and drains."""
        try:
            self.channel.sendall(READY)
        except OSError:
            pass
        self.channel.close()


def take_over(path: str | None) -> Takeover | None:
    """Ask a running l4router on `path` for its sockets (blocking, before the reactor runs);
    None when none answers (the first start, or a stale socket file)."""
    if not path or not os.path.exists(path):
        return None
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.settimeout(ASK_TIMEOUT)
    try:
        channel.connect(path)
        channel.sendall(TAKEOVER)
        message, fds, _, _ = socket.recv_fds(channel, 1 << 16, MAX_FDS)
    except OSError:
        channel.close()
        return None
    counts = json.loads(message)
    sockets, taken = {}, iter(fds)
    for description, count in counts:
        sockets[description] = [next(taken) for _ in range(count)]
    log.info("Took over {count} listening sockets from the running l4router", count=len(fds))
    return Takeover(channel, sockets)


class _Listening(abstract.FileDescriptor):
    """The upgrade socket: every successor that connects gets a _Channel."""

    def __init__(self, reactor, sock, service):
        super().__init__(reactor)
        self.sock = sock
        self.service = service

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        try:
            channel, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        channel.setblocking(False)
        _Channel(self.reactor, channel, self.service).startReading()
        return None


class _Channel(abstract.FileDescriptor):
    """One successor asking: its sockets, then (once it says it is ready) our stop."""

    def __init__(self, reactor, channel, service):
        super().__init__(reactor)
        self.channel = channel
        self.service = service
        self.received = b""
        self.sent = False

    def fileno(self):
        return self.channel.fileno()

    def doRead(self):
        try:
            data = self.channel.recv(64)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data or len(self.received) > 64:
            return error.ConnectionDone()
        self.received += data
        if not self.sent and self.received.startswith(TAKEOVER):
            self.sent = True
            self.service.hand_over(self.channel)
        if self.sent and READY in self.received:
            self.service.successor_ready(_peer_pid(self.channel))
            return error.ConnectionDone()
        return None

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.channel.close()
        if self.sent and READY not in self.received:
            log.warn("The new l4router went away before it was ready: this one goes on")


class UpgradeService(Service):
    """Serves `path` for a successor. `sockets()` says what to hand over ({description:
    [fd, ...]}); `stop()` is how this process stops once its successor accepts."""

    def __init__(self, reactor, path: str, sockets, stop):
        self.reactor = reactor
        self.path = path
        self.sockets = sockets
        self.stop = stop
        self.listening = None
        self.inode = None

    def startService(self):
        super().startService()
        if os.path.exists(self.path):
            os.unlink(self.path)  # the predecessor's, which it no longer needs
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # only this user may take the sockets over
        try:
            sock.bind(self.path)
        finally:
            os.umask(previous)
        sock.listen(4)
        sock.setblocking(False)
        self.inode = os.stat(self.path).st_ino
        self.listening = _Listening(self.reactor, sock, self)
        self.listening.startReading()

    def stopService(self):
        super().stopService()
        if self.listening is None:
            return
        self.listening.stopReading()
        self.listening.sock.close()
        self.listening = None
        try:
            if os.stat(self.path).st_ino == self.inode:  # not a successor's by now
                os.unlink(self.path)
        except OSError:
            pass

    def hand_over(self, channel: socket.socket) -> None:
        handed = [(d, fds) for d, fds in self.sockets().items() if fds]
        counts = [(description, len(fds)) for description, fds in handed]
        fds = [fd for _, fds in handed for fd in fds]
        channel.setblocking(True)
        socket.send_fds(channel, [json.dumps(counts).encode()], fds)
        channel.setblocking(False)
        log.info(
            "Handed {count} listening sockets to a new l4router; waiting for it to be ready",
            count=len(fds),
        )

    def successor_ready(self, pid: int | None) -> None:
        log.info(
            "The new l4router (pid {pid}) accepts: this one stops accepting and drains", pid=pid
        )
        self.reactor.callLater(0, self.stop)


def _peer_pid(channel: socket.socket) -> int | None:
    try:
        credentials = channel.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
    except OSError:
        return None
    return struct.unpack("3i", credentials)[0]
