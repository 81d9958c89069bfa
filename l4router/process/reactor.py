"""The epoll reactor l4router runs on: twistd's `--reactor=l4router`, and what `twistd
l4router` installs when no reactor was chosen.

Five differences from Twisted's EPollReactor, all about what a short connection costs:

- No per-event logging context. Twisted hands every ready descriptor to `log.callWithLogger`,
  which asks it for its log prefix and pushes a context around the call. l4router logs
  through `twisted.logger` with explicit fields and never reads that context.
- Registrations change once per turn of the loop, just before the wait: a connect's read
  and write interest, or a stop and a start, cost one epoll_ctl (or none), not one each.
- Read interest is dropped lazily. A transport that stops reading (paused while its backend
  connects, half-closed, about to close) keeps its epoll registration; only if the kernel then
  reports it readable is the registration changed. A pause and a resume, or a stop just
  before the socket is closed (which removes it from epoll by itself), then cost no
  epoll_ctl at all. Write interest is dropped at once (a socket is nearly always writable,
  so keeping it would only wake the loop). Only TCP connections are treated so: their
  sockets are this process's alone, so closing one removes it from epoll; anything else
  (a listening port adopted from the supervisor is a duplicate of a descriptor that stays
  open) is synchronised at once, as Twisted does.
- A Stream (l4router.connection.stream) is registered once for its whole life, edge-
  triggered (`watch_edges`, at once rather than at the end of the turn): what it wants to
  read or write is its own flag, not a registration to keep up to date, and the close takes
  it out of epoll. A Stream that has bytes left to read after its turn asks to be read again
  on the next turn (`read_again`: the wait then does not block).
- A Stream is handed its events directly: it deals with its own ends and errors, so
  Twisted's `_doReadOrWrite` checks are skipped for it (what it returns or raises still ends
  it through `_disconnectSelectable`).

Everything else, the timed calls, threads, signals and `_doReadOrWrite` itself for other
descriptors (it turns a raised doRead/doWrite into a logged, closed connection), is Twisted's.
"""

from __future__ import annotations

import sys
from select import EPOLLET, EPOLLRDHUP
from typing import Any

from twisted.internet.epollreactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPollReactor
from twisted.internet.tcp import Connection
from twisted.logger import Logger

from l4router.connection.stream import Stream

log = Logger()

_ALWAYS = EPOLLERR | EPOLLHUP  # reported whatever the registration asks for
_EDGES = EPOLLIN | EPOLLRDHUP | EPOLLET  # a Stream's registration (EPOLLOUT added on demand)


_OWN_SOCKETS = (Connection, Stream)  # TCP connections: their sockets are this process's alone


def _closed(owner) -> bool:
    """A TCP connection whose socket is closed: closing took it out of epoll already."""
    return isinstance(owner, _OWN_SOCKETS) and owner.fileno() == -1


class LeanEPollReactor(EPollReactor):
    def __init__(self) -> None:
        self._target: dict[int, tuple[int, object]] = {}  # fd -> (events, owner) wanted there
        self._kernel: dict[int, tuple[int, object]] = {}  # fd -> (events, owner) registered
        self._dirty: set[int] = set()  # fds whose registration is to be brought up to date
        self._edges: dict[int, Stream] = {}  # fd -> the Stream registered edge-triggered there
        self._again: list[Stream] = []  # Streams with bytes left to read on the next turn
        super().__init__()

    # Streams, registered once and edge-triggered

    def watch_edges(self, stream: Stream, writable: bool) -> None:
        """Register `stream` until its socket closes: readable, and writable if asked. At
        once: its one registration has nothing to be merged with."""
        fd = stream.fileno()
        events = _EDGES | (EPOLLOUT if writable else 0)
        self._edges[fd] = stream
        self._target.pop(fd, None)  # a change still due for the number's previous owner
        self._dirty.discard(fd)
        try:
            self._poller.register(fd, events)
        except FileExistsError:  # left by a closed owner of the same number
            self._poller.modify(fd, events)
        self._kernel[fd] = (events, stream)

    def watch_writable(self, stream: Stream) -> None:
        """Its registration asks for writability too from now on."""
        fd = stream.fileno()
        self._poller.modify(fd, _EDGES | EPOLLOUT)
        self._kernel[fd] = (_EDGES | EPOLLOUT, stream)

    def read_again(self, stream: Stream) -> None:
        self._again.append(stream)

    def forget_edges(self, stream: Stream) -> None:
        """Its socket is about to close, which takes it out of epoll: forget it here."""
        fd = stream.fileno()
        if self._edges.get(fd) is stream:
            del self._edges[fd]
            self._target.pop(fd, None)
            self._kernel.pop(fd, None)
            self._dirty.discard(fd)

    def level_trigger(self, stream: Stream) -> None:
        """From now on `stream` asks through addReader/addWriter (level-triggered): its
        registration is changed by the next of those in this turn, or removed."""
        fd = stream.fileno()
        if self._edges.pop(fd, None) is stream:
            self._register(fd, 0, stream)

    def removeAll(self) -> list:
        """Twisted's, and the edge-triggered Streams (disconnectAll ends them all)."""
        streams = list(self._edges.values())
        for stream in streams:
            self.forget_edges(stream)
        self._again.clear()
        return super().removeAll() + streams

    # What the descriptors want, and what the kernel has

    def _wanted(self, fd: int) -> int:
        return (EPOLLIN if fd in self._reads else 0) | (EPOLLOUT if fd in self._writes else 0)

    def _registered(self, fd: int, owner) -> int:
        """The events `fd` is (or is about to be) registered for on behalf of `owner`."""
        events, registered_for = self._target.get(fd, (0, None))
        return events if registered_for is owner else 0

    def _register(self, fd: int, events: int, owner) -> None:
        """Register `fd` for exactly `events` (0: none) before the next wait. Changes within
        one turn of the loop (a connect's read and write interest, say) make one call."""
        self._target[fd] = (events, owner)
        self._dirty.add(fd)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for fd in dirty:
            events, owner = self._target.get(fd, (0, None))
            held, held_for = self._kernel.get(fd, (0, None))
            try:
                if not events:
                    self._target.pop(fd, None)
                    if self._kernel.pop(fd, None) is not None and not _closed(owner):
                        self._poller.unregister(fd)
                elif not held or held_for is not owner:
                    try:
                        self._poller.register(fd, events)
                    except FileExistsError:  # left by a closed owner of the same number
                        self._poller.modify(fd, events)
                elif events != held:
                    try:
                        self._poller.modify(fd, events)
                    except FileNotFoundError:  # removed when its descriptor was closed
                        self._poller.register(fd, events)
            except PermissionError:  # a regular file: epoll cannot, so poll it continuously
                self._poll_continuously(fd, owner)
                continue
            except OSError:  # closed before it was ever waited on: nothing to register
                self._target.pop(fd, None)
                self._kernel.pop(fd, None)
                continue
            if events:
                self._kernel[fd] = (events, owner)

    def _poll_continuously(self, fd, owner):
        """What Twisted's EPollReactor does for descriptors epoll refuses (EPERM)."""
        self._target.pop(fd, None)
        if fd in self._reads:
            self._reads.discard(fd)
            self._continuousPolling.addReader(owner)
        if fd in self._writes:
            self._writes.discard(fd)
            self._continuousPolling.addWriter(owner)
        self._selectables.pop(fd, None)

    def _add(self, xer, primary, other, selectables, event, antievent):
        fd = xer.fileno()
        if fd in primary and selectables.get(fd) is xer:
            return
        if selectables.get(fd) not in (None, xer):  # the number was reused: start afresh
            self._reads.discard(fd)
            self._writes.discard(fd)
        primary.add(fd)
        selectables[fd] = xer
        wanted = self._wanted(fd)
        kept = self._registered(fd, xer)
        if wanted & ~kept:
            self._register(fd, wanted | kept, xer)

    def _remove(self, xer, primary, other, selectables, event, antievent):
        fd = xer.fileno()
        if fd == -1:  # closed: the kernel has dropped it; forget it here too
            for fd, owner in list(selectables.items()):
                if owner is xer:
                    self._reads.discard(fd)
                    self._writes.discard(fd)
                    del selectables[fd]
                    self._target.pop(fd, None)
                    self._kernel.pop(fd, None)
            return
        if fd not in primary or selectables.get(fd) is not xer:
            if getattr(xer, "disconnected", False) and self._registered(fd, xer):
                # Closing after its interest went lazily: the kernel drops the socket, the
                # registration here goes with it (it would keep the owner alive).
                self._register(fd, 0, xer)
            return
        primary.discard(fd)
        wanted = self._wanted(fd)
        if not wanted:
            del selectables[fd]
        if not isinstance(xer, _OWN_SOCKETS):
            self._register(fd, wanted, xer)
            if not wanted:
                # Out of epoll now, before its owner closes it: a socket other processes
                # hold too (a listening socket every worker accepts on) stays registered
                # when this process closes its descriptor, and would go on waking it.
                self._flush()
        elif getattr(xer, "disconnected", False):
            # Closing: its other interest goes next (FileDescriptor.connectionLost stops
            # reading, then writing); one removal then does for both.
            if not wanted:
                self._register(fd, 0, xer)
        elif event == EPOLLOUT:
            self._register(fd, wanted | (self._registered(fd, xer) & EPOLLIN), xer)

    # The loop

    def doPoll(self, timeout: float | None) -> None:
        if self._again:
            self._read_again()
        if self._dirty:
            self._flush()
        if self._again:
            timeout = 0
        try:
            events = self._poller.poll(
                -1 if timeout is None else timeout, max(1, len(self._kernel))
            )
        except InterruptedError:
            return
        selectables = self._selectables
        handle = self._doReadOrWrite
        reads, writes, kernel = self._reads, self._writes, self._kernel
        edges = self._edges
        for fd, event in events:
            stream = edges.get(fd)
            if stream is not None:  # edge-triggered: what it wants is the Stream's to know
                # A hang-up with bytes left is read first: now, or once resumed if the
                # relay's other side was full when both ends closed (not after a reset).
                if event & _ALWAYS and not (
                    event & EPOLLIN and (stream.reading or (stream.paused and not event & EPOLLERR))
                ):
                    stream.hung_up(stream.reading)
                    continue
                try:
                    stream.on_edge(event)
                except Exception as exc:
                    self._stream_failed(stream, exc)
                continue
            selectable = selectables.get(fd)
            if selectable is None:  # nobody wants it any more: drop the lazy registration
                self._register(fd, 0, kernel.get(fd, (0, None))[1])
                continue
            wanted = (EPOLLIN if fd in reads else 0) | (EPOLLOUT if fd in writes else 0)
            if event & (EPOLLIN | EPOLLOUT) & ~wanted:  # what a lazy registration still asks
                self._register(fd, wanted, kernel.get(fd, (0, None))[1])
                event &= wanted | _ALWAYS
                if not event:
                    continue
            try:
                if isinstance(selectable, Stream):
                    self._handle_stream(selectable, event, wanted)
                else:
                    handle(selectable, fd, event)
            except Exception:  # _doReadOrWrite catches what doRead raises; this is the rest
                log.failure("Event handling for {selectable!r} failed", selectable=selectable)

    def _read_again(self) -> None:
        again, self._again = self._again, []
        for stream in again:
            if stream.reading and stream.readable:
                try:
                    stream.on_edge(EPOLLIN)
                except Exception as exc:
                    self._stream_failed(stream, exc)

    def _stream_failed(self, stream: Any, exc: Exception) -> None:
        log.failure("Stream {stream!r} failed", stream=stream)
        self._disconnectSelectable(stream, exc, False)

    def _handle_stream(self, stream: Any, event: int, wanted: int) -> None:
        """Twisted's _doReadOrWrite for a Stream, without what a Stream does not need (it
        deals with its own ends and errors; a closed one is no longer registered). What its
        doRead or doWrite return (the splice relay's pump) or raise ends it as there."""
        if event & _ALWAYS and not event & EPOLLIN:  # hung up, with nothing left to read
            stream.hung_up(bool(wanted & EPOLLIN))
            return
        why = None
        in_read = False
        try:
            if event & EPOLLIN:
                why = stream.doRead()
                in_read = True
            if not why and event & EPOLLOUT and not stream.disconnected:
                why = stream.doWrite()
                in_read = False
        except Exception as exc:
            log.failure("Stream {stream!r} failed", stream=stream)
            why = exc
        if why:
            self._disconnectSelectable(stream, why, in_read)

    doIteration = doPoll


def install() -> LeanEPollReactor:
    """Install it as the global reactor (Twisted's `installReactor` contract)."""
    from twisted.internet.main import installReactor

    reactor = LeanEPollReactor()
    installReactor(reactor)
    return reactor


def install_unless_chosen() -> None:
    """Install it when nothing has installed a reactor yet (no `--reactor`, no import of
    `twisted.internet.reactor`): on Linux; elsewhere Twisted's default stays."""
    if "twisted.internet.reactor" in sys.modules or not sys.platform.startswith("linux"):
        return
    install()
