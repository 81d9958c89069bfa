"""Active health checks (a TCP connect within `timeout` every `interval`, with rise/fall
thresholds) and the passive signal of connect failures and resets seen by real clients."""

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class _Probe(Protocol):
    def connectionMade(self):
        self.transport.abortConnection()  # a completed handshake is all a check needs


class _ProbeFactory(Factory):
    noisy = False
    protocol = _Probe


class HealthChecker:
    """Counts consecutive results for one server and flips its health at rise/fall."""

    def __init__(self, server, settings, reactor, metrics):
        self.server = server
        self.settings = settings
        self.reactor = reactor
        self.successes = 0
        self.failures = 0
        self.loop = LoopingCall(self.check)
        self.loop.clock = reactor
        self._checking = None
        self._metric_ok = metrics.health_checks.labels(server.backend, server.label, "ok")
        self._metric_failed = metrics.health_checks.labels(server.backend, server.label, "failed")

    def start(self):
        self.loop.start(self.settings.interval, now=True)

    def stop(self):
        if self.loop.running:
            self.loop.stop()
        if self._checking is not None:
            self._checking.cancel()

    def check(self):
        if self._checking is not None:
            return  # the previous check is still waiting for its timeout
        endpoint = self.server.endpoint(self.reactor, self.settings.timeout)
        if endpoint is None:
            self.record(False, "address not resolved")
            return
        self._checking = endpoint.connect(_ProbeFactory())
        self._checking.addCallbacks(lambda _: self.record(True, "check passed"),
                                    lambda failure: self.record(
                                        False, f"check failed: {failure.getErrorMessage()}"))
        self._checking.addBoth(self._done)

    def _done(self, _):
        self._checking = None

    def record(self, ok, why, passive=False):
        """A check result, or a passive one (a client's connect failed or was reset)."""
        if not passive:
            (self._metric_ok if ok else self._metric_failed).inc()
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.server.healthy and self.successes >= self.settings.rise:
                self.server.set_healthy(True, f"{self.successes} checks passed")
        else:
            self.failures += 1
            self.successes = 0
            if self.server.healthy and self.failures >= self.settings.fall:
                self.server.set_healthy(False, f"{self.failures} failures in a row, last: {why}")
