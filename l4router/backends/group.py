"""A named backend: choosing a server for a client and connecting to it, with failover,
retries with exponential backoff, per-server limits, warm pools and health."""

import random

from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from l4router.backends.balancing import POLICIES
from l4router.backends.health import HealthChecker
from l4router.backends.pool import ServerPool
from l4router.backends.resolve import NameRefresher
from l4router.backends.server import ProtocolOnce, ServerState
from l4router.errors import BackendUnavailable
from l4router.relay import BackendSide

log = Logger()

# Reasons a client gets no backend connection (close reasons and metric labels).
NO_HEALTHY_SERVER = "no_healthy_server"
BACKEND_FULL = "backend_full"
CONNECT_FAILED = "connect_failed"


def failure_reason(failure):
    """A short label for why a connect failed: refused, timeout, unreachable, ..."""
    for kind, label in ((error.ConnectionRefusedError, "refused"),
                        (error.TimeoutError, "timeout"),
                        (error.DNSLookupError, "dns"),
                        (error.NoRouteError, "unreachable")):
        if failure.check(kind):
            return label
    return "error"


class BackendGroup:
    """The servers of one backend and how a client is connected to one of them."""

    def __init__(self, backend, reactor, metrics, jitter_random=None):
        self.config = backend
        self.name = backend.name
        self.reactor = reactor
        self.metrics = metrics
        self.random = jitter_random or random.Random()
        self.balancer = POLICIES[backend.balance]()
        self.servers = [ServerState(backend.name, s, metrics) for s in backend.servers]
        self.checkers = {}
        if backend.health_check is not None:
            self.checkers = {s: HealthChecker(s, backend.health_check, reactor, metrics)
                             for s in self.servers}
        self.pools = []
        if backend.pool.min_idle:
            self.pools = [ServerPool(s, backend.pool, reactor, backend.connect_timeout, metrics)
                          for s in self.servers]
        self.refreshers = [NameRefresher(s, reactor) for s in self.servers if s.address is None]
        self._connect_seconds = metrics.connect_seconds.labels(backend.name)
        self._retries = metrics.retries.labels(backend.name)
        self._pool_hits = metrics.pool_requests.labels(backend.name, "hit")
        self._pool_misses = metrics.pool_requests.labels(backend.name, "miss")

    def start(self):
        for part in (*self.refreshers, *self.checkers.values(), *self.pools):
            part.start()

    def stop(self):
        for part in (*self.refreshers, *self.checkers.values(), *self.pools):
            part.stop()

    def status(self):
        return {"backend": self.name, "balance": self.config.balance,
                "servers": [s.status() for s in self.servers]}

    # Connecting a client

    @defer.inlineCallbacks
    def connect(self, source):
        """Fires with (ServerState, BackendSide) once connected; the ServerState is acquired
        (release it when the relay ends). Fails with BackendUnavailable."""
        retry = self.config.retry
        tried = {}  # server -> the attempt that last tried it
        last = None
        for attempt in range(1, retry.attempts + 1):
            server = self._choose(source, tried)
            if attempt > 1:
                self._retries.inc()
                yield task.deferLater(self.reactor, self._jittered(retry.backoff(attempt - 1)),
                                      lambda: None)
                if not server.healthy:  # it went down while we waited
                    server = self._choose(source, tried)
            server.acquire()
            spare = self._take_spare(server)
            if spare is not None:
                return server, spare
            backend_side = BackendSide()
            started = self.reactor.seconds()
            try:
                yield self._connect_once(server, backend_side)
            except defer.CancelledError:
                server.release()
                raise
            except Exception:
                server.release()
                last = Failure()
                reason = failure_reason(last)
                tried[server] = attempt
                self.metrics.connect_failures.labels(self.name, server.label, reason).inc()
                self.passive_result(server, False, f"connect {reason}")
                log.info("Backend {backend} server {server} attempt {attempt}/{attempts} "
                         "failed: {reason}", backend=self.name, server=server.label,
                         attempt=attempt, attempts=retry.attempts, reason=reason)
                continue
            self._connect_seconds.observe(self.reactor.seconds() - started)
            self.passive_result(server, True, "connected")
            return server, backend_side
        raise BackendUnavailable(self.name, CONNECT_FAILED,
                                 f"{retry.attempts} attempts, last: {last.getErrorMessage()}")

    def pick(self, source):
        """A server for a UDP session (no connect to make), acquired: release it at the end.
        Raises BackendUnavailable."""
        server = self._choose(source, {})
        if server.address is None:
            raise BackendUnavailable(self.name, CONNECT_FAILED, f"{server.label} not resolved")
        server.acquire()
        return server

    def _connect_once(self, server, protocol):
        self.metrics.connect_attempts.labels(self.name, server.label).inc()
        endpoint = server.endpoint(self.reactor, self.config.connect_timeout)
        if endpoint is None:
            return defer.fail(error.DNSLookupError(f"{server.server.host} not resolved yet"))
        return endpoint.connect(ProtocolOnce(protocol))

    def _choose(self, source, tried):
        healthy = [s for s in self.servers if s.healthy]
        if not healthy:
            raise BackendUnavailable(self.name, NO_HEALTHY_SERVER)
        limit = self.config.max_connections_per_server
        open_servers = [s for s in healthy if limit is None or s.active < limit]
        if not open_servers:
            raise BackendUnavailable(self.name, BACKEND_FULL)
        untried = [s for s in open_servers if s not in tried]
        if untried:
            return self.balancer.choose(untried, source)
        return min(open_servers, key=tried.get)  # every one failed once: the longest ago

    def _take_spare(self, server):
        if server.pool is None:
            return None
        spare = server.pool.take()
        (self._pool_hits if spare is not None else self._pool_misses).inc()
        return spare

    def _jittered(self, seconds):
        jitter = self.config.retry.jitter
        return seconds * self.random.uniform(1 - jitter, 1 + jitter)

    def passive_result(self, server, ok, why):
        """What real clients saw: consecutive connect failures and resets count like failed
        checks (only with health checks configured: they are what brings a server back)."""
        checker = self.checkers.get(server)
        if checker is not None:
            checker.record(ok, f"passive: {why}", passive=True)
