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
        self.admin_state = "enabled"  # or draining, disabled: set at run time (control.py)
        self.on_change = None  # the group's, to follow its backup tier
        self.address = _literal(server.host)  # None until a host name is resolved
        self.pool = None
        self._metric_up = metrics.server_up.labels(backend, self.label)
        self._metric_active = metrics.server_active.labels(backend, self.label)
        self._metric_up.set(1)
        self._metric_state = metrics.server_admin_state
        self._set_state_metric(1)

    def endpoint(self, reactor, timeout):
        if self.address is None:
            return None
        kind = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        return kind(reactor, self.address, self.server.port, timeout=timeout)

    @property
    def eligible(self):
        """Gets new clients: healthy, and neither drained nor disabled by an operator."""
        return self.healthy and self.admin_state == "enabled"

    def set_admin_state(self, state):
        if state == self.admin_state:
            return
        self._set_state_metric(0)
        self.admin_state = state
        self._set_state_metric(1)
        if self.pool is not None:  # spares are new connections: none to a drained server
            self.pool.refill() if state == "enabled" else self.pool.drop_idle()
        if self.on_change is not None:
            self.on_change()

    def _set_state_metric(self, value):
        self._metric_state.labels(self.backend, self.label, self.admin_state).set(value)

    def forget_metrics(self):
        """A server removed at run time: its series say it is neither up nor in any state."""
        self._metric_up.set(0)
        self._metric_active.set(0)
        self._set_state_metric(0)

    def set_healthy(self, healthy, why):
        if healthy == self.healthy:
            return
        self.healthy = healthy
        self._metric_up.set(1 if healthy else 0)
        if self.on_change is not None:
            self.on_change()
        if healthy:
            log.info(
                "Backend {backend} server {server} is up: {why}",
                backend=self.backend,
                server=self.label,
                why=why,
            )
        else:
            log.warn(
                "Backend {backend} server {server} is down: {why}",
                backend=self.backend,
                server=self.label,
                why=why,
            )

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
        return {
            "server": self.label,
            "address": self.address,
            "weight": self.weight,
            "backup": self.backup,
            "state": self.admin_state,
            "healthy": self.healthy,
            "active_connections": self.active,
            "pool_idle": self.pool.idle_count if self.pool is not None else 0,
        }


def _literal(host):
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None
