"""Warm pools: spare connections made before a client needs them, one client each.

A spare is discarded when it is too old (`max_lifetime`), idle too long (`idle_timeout`), or
when its server closes it or sends anything: a spare that is handed out has never been read
from, so the client sees the server's stream from its first byte.
"""

import collections

from twisted.logger import Logger

from l4router.backends.server import ProtocolOnce
from l4router.connection.relay import BackendSide
from l4router.timers import cancel

log = Logger()

REFILL_BACKOFF_INITIAL = 0.1
REFILL_BACKOFF_MAX = 30.0


class Spare(BackendSide):
    """A BackendSide waiting in a pool: until a relay takes it, any event spoils it."""

    pool = None
    created = 0.0
    expiry = None

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)  # as OutboundConnection's: relayed bytes go at once
        self.pool.arrived(self)

    def spoiled(self):
        """Its server sent data or closed it while it waited."""
        if self.pool is not None:
            self.pool.discard(self)


class ServerPool:
    """Keeps `min_idle` spares to one server (never above `max_idle`); refills with backoff."""

    def __init__(self, server, settings, reactor, connect_timeout, metrics):
        self.server = server
        self.settings = settings
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.spares = collections.deque()
        self.connecting = 0
        self.running = False
        self.backoff = 0.0
        self._refill_call = None
        self._metric_idle = metrics.pool_idle.labels(server.backend, server.label)
        server.pool = self

    @property
    def idle_count(self):
        return len(self.spares)

    def start(self):
        self.running = True
        self.refill()

    def stop(self):
        self.running = False
        cancel(self._refill_call)
        self.drop_idle()

    def drop_idle(self):
        """Close every spare (the server is stopping, drained or disabled)."""
        while self.spares:
            self.discard(self.spares[0])

    def take(self):
        """A fresh spare, or None. The caller owns it from now on."""
        now = self.reactor.seconds()
        while self.spares:
            spare = self.spares.popleft()
            self._forget(spare)
            if now - spare.created < self.settings.max_lifetime and spare.transport.connected:
                self.refill()
                return spare
            spare.transport.abortConnection()
        self.refill()
        return None

    def refill(self):
        if not self.running or self._refill_call is not None and self._refill_call.active():
            return
        wanted = min(self.settings.min_idle, self.settings.max_idle)
        while self.server.eligible and len(self.spares) + self.connecting < wanted:
            endpoint = self.server.endpoint(self.reactor, self.connect_timeout)
            if endpoint is None:
                return
            spare = Spare()
            spare.pool = self
            self.connecting += 1
            endpoint.connect(ProtocolOnce(spare)).addErrback(self._failed)

    def arrived(self, spare):
        self.connecting -= 1
        self.backoff = 0.0
        if not self.running or len(self.spares) >= self.settings.max_idle:
            spare.pool = None
            spare.transport.abortConnection()
            return
        spare.created = self.reactor.seconds()
        lifetime = min(self.settings.idle_timeout, self.settings.max_lifetime)
        spare.expiry = self.reactor.callLater(lifetime, self.discard, spare)
        self.spares.append(spare)
        self._metric_idle.set(len(self.spares))

    def discard(self, spare):
        if spare in self.spares:
            self.spares.remove(spare)
        self._forget(spare)
        spare.pool = None
        if spare.transport is not None and spare.transport.connected:
            spare.transport.abortConnection()
        self.refill()

    def _forget(self, spare):
        cancel(spare.expiry)
        spare.expiry = None
        spare.pool = None
        self._metric_idle.set(len(self.spares))

    def _failed(self, failure):
        self.connecting -= 1
        self.backoff = min(REFILL_BACKOFF_MAX, max(REFILL_BACKOFF_INITIAL, self.backoff * 2))
        log.info(
            "Backend {backend} server {server}: pool connect failed ({error}); "
            "retrying in {backoff}s",
            backend=self.server.backend,
            server=self.server.label,
            error=failure.getErrorMessage(),
            backoff=self.backoff,
        )
        if self.running:
            self._refill_call = self.reactor.callLater(self.backoff, self._retry)

    def _retry(self):
        self._refill_call = None
        self.refill()
