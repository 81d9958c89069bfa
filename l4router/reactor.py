"""The epoll reactor without the per-event logging context: twistd's `--reactor=l4router`, and
what `twistd l4router` installs when no reactor was chosen.

Twisted's EPollReactor hands every ready descriptor to `log.callWithLogger`, which asks the
descriptor for its log prefix and pushes a logging context around the call, on every event.
l4router logs through `twisted.logger` with explicit fields and never reads that context, and
on a short connection those wrappers cost as much as the work (bench/RESULTS.md). Everything
else, the timed calls, the threads, the signal handling and `_doReadOrWrite` itself (which
turns a raised doRead/doWrite into a logged, closed connection), is Twisted's own.
"""

from __future__ import annotations

import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class LeanEPollReactor(EPollReactor):
    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:  # _doReadOrWrite catches what doRead raises; this is the rest
                log.failure("Event handling for {selectable!r} failed", selectable=selectable)

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
