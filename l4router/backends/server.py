"""One server of a backend: its address, health, load and spare connections."""

import ipaddress

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger()


class ProtocolOnce(Factory):
    """Hands out one already-built protocol; quiet, unlike connectProtocol's factory."""

    noisy = False

    def __init__(self, protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


class ServerState:
    """The live state of a configured server; balancers, health checks and pools share it."""

    def __init__(self, backend, server, metrics):
        self.backend = backend  # the backend's name
        self.server = server
        self.label = server.label
        self.weight = server.weight
        self.current_weight = 0  # smooth weighted round robin's running weight
        self.active = 0  # connections handed out or being connected
        self.healthy = True
        self.on_change = None  # the group's, to follow its backup tier
        self.address = _literal(server.host)  # None until a host name is resolved
        self.pool = None
        self._metric_up = metrics.server_up.labels(backend, self.label)
        self._metric_active = metrics.server_active.labels(backend, self.label)
        self._metric_up.set(1)

    def endpoint(self, reactor, timeout):
        if self.address is None:
            return None
        kind = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        return kind(reactor, self.address, self.server.port, timeout=timeout)

    def set_healthy(self, healthy, why):
        if healthy == self.healthy:
            return
        self.healthy = healthy
        self._metric_up.set(1 if healthy else 0)
        if self.on_change is not None:
            self.on_change()
        if healthy:
            log.info("Backend {backend} server {server} is up: {why}", backend=self.backend,
                     server=self.label, why=why)
        else:
            log.warn("Backend {backend} server {server} is down: {why}", backend=self.backend,
                     server=self.label, why=why)

    def acquire(self):
        self.active += 1
        self._metric_active.set(self.active)

    def release(self):
        self.active -= 1
        self._metric_active.set(self.active)

    @property
    def backup(self):
        return self.server.backup

    def status(self):
        return {"server": self.label, "address": self.address, "weight": self.weight,
                "backup": self.backup,
                "healthy": self.healthy, "active_connections": self.active,
                "pool_idle": self.pool.idle_count if self.pool is not None else 0}


def _literal(host):
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None
