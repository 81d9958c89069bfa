"""Servers given by host name: resolved with the reactor's resolver (never blocking it) when
the backends start, then again every RESOLVE_INTERVAL seconds."""

from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

RESOLVE_INTERVAL = 30.0


@implementer(IResolutionReceiver)
class _FirstAddress:
    def __init__(self, done):
        self.done = done
        self.addresses = []

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        self.addresses.append(address.host)

    def resolutionComplete(self):
        self.done(self.addresses)


class NameRefresher:
    """Keeps `server.address` set to the first address its host name resolves to."""

    def __init__(self, server, reactor, interval=RESOLVE_INTERVAL):
        self.server = server
        self.reactor = reactor
        self.loop = LoopingCall(self.resolve)
        self.loop.clock = reactor
        self.interval = interval

    def start(self):
        self.loop.start(self.interval, now=True)

    def stop(self):
        if self.loop.running:
            self.loop.stop()

    def resolve(self):
        host = self.server.server.host
        self.reactor.nameResolver.resolveHostName(
            _FirstAddress(self._resolved), host, self.server.server.port
        )

    def _resolved(self, addresses):
        if not addresses:
            log.warn(
                "Backend {backend} server {server}: {host} did not resolve; keeping {address}",
                backend=self.server.backend,
                server=self.server.label,
                host=self.server.server.host,
                address=self.server.address,
            )
            return
        if addresses[0] != self.server.address:
            log.info(
                "Backend {backend} server {server} resolves to {address}",
                backend=self.server.backend,
                server=self.server.label,
                address=addresses[0],
            )
            self.server.address = addresses[0]
