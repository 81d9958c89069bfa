"""A named backend: choosing a server for a client and connecting to it, with failover,
retries with exponential backoff, per-server limits, warm pools and health."""

import random

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure

from l4router.backends.balancing import POLICIES
from l4router.backends.discovery import discovery_for
from l4router.backends.health import HealthChecker
from l4router.backends.outbound import OutboundConnection, failure_reason
from l4router.backends.pool import ServerPool
from l4router.backends.resolve import NameRefresher
from l4router.backends.server import ServerState
from l4router.config import DnsSettings
from l4router.connection.reasons import Reason
from l4router.connection.relay import BackendSide
from l4router.errors import BackendUnavailable
from l4router.timers import Deadlines, cancel

log = Logger()


class BackendGroup:
    """The servers of one backend and how a client is connected to one of them."""

    limit = None  # its `max_connections`, held by each client connected through it
    # What makes a connection to a server for a client (the in-memory tests record them).
    open_connection = OutboundConnection

    def __init__(self, backend, reactor, metrics, jitter_random=None, dns_settings=None):
        self.config = backend
        self.name = backend.name
        self.reactor = reactor
        self.metrics = metrics
        self.random = jitter_random or random.Random()
        self.balancer = POLICIES[backend.balance]()
        self.servers = []
        self.checkers = {}  # ServerState -> HealthChecker, with health_check configured
        self.pools = {}  # ServerState -> ServerPool, with pool.min_idle
        self.refreshers = {}  # ServerState -> NameRefresher, for a server named by host name
        self._backup_was_serving = False
        self._backup_serving = metrics.backup_serving.labels(backend.name)
        self._backup_serving.set(0)
        self.running = False
        self.on_server_added = None  # what the runtime state says of a server added later
        for server in backend.servers:
            self._add(server)
        self.discovery = discovery_for(self, reactor, dns_settings or DnsSettings())
        self._connect_seconds = metrics.connect_seconds.labels(backend.name)
        self._retries = metrics.retries.labels(backend.name)
        self._pool_hits = metrics.pool_requests.labels(backend.name, "hit")
        self._pool_misses = metrics.pool_requests.labels(backend.name, "miss")
        self.connect_deadlines = Deadlines(reactor, backend.connect_timeout)

    def _add(self, server_config):
        """A server and the parts that keep it: name resolution, health checks, a pool."""
        backend = self.config
        server = ServerState(backend.name, server_config, self.metrics)
        server.on_change = self._health_changed
        self.servers.append(server)
        if backend.health_check is not None:
            self.checkers[server] = HealthChecker(
                server, backend.health_check, self.reactor, self.metrics
            )
        if backend.pool.min_idle:
            self.pools[server] = ServerPool(
                server, backend.pool, self.reactor, backend.connect_timeout, self.metrics
            )
        if server.address is None:
            self.refreshers[server] = NameRefresher(server, self.reactor)
        return server

    def _parts(self, server):
        return [
            table[server]
            for table in (self.refreshers, self.checkers, self.pools)
            if server in table
        ]

    def start(self):
        self.running = True
        for server in self.servers:
            for part in self._parts(server):
                part.start()
        if self.discovery is not None:
            self.discovery.start()

    def stop(self):
        self.running = False
        if self.discovery is not None:
            self.discovery.stop()
        for server in self.servers:
            for part in self._parts(server):
                part.stop()

    def replace_servers(self, configs):
        """Discovery found this set: servers gone are removed (their relays go on), new ones
        added, changed weights and tiers taken."""
        wanted = {server.label: server for server in configs}
        for server in list(self.servers):
            if server.label not in wanted:
                self.remove_server(server.label)
        for label, config in wanted.items():
            server = self.server(label)
            if server is None:
                self.add_server(config)
            elif server.server != config:
                server.server, server.weight = config, config.weight
        self._health_changed()

    # Runtime control (l4router.backends.control)

    def server(self, label):
        return next((s for s in self.servers if s.label == label), None)

    def add_server(self, server_config):
        """A server added at run time; it gets clients at once (health checks, when
        configured, start from "up" as at start-up)."""
        server = self._add(server_config)
        if self.on_server_added is not None:
            self.on_server_added(server)
        if self.running:
            for part in self._parts(server):
                part.start()
        self._health_changed()
        return server

    def remove_server(self, label):
        """No new clients from now on; relays already on it go on until they end."""
        server = self.server(label)
        if server is None:
            return None
        for part in self._parts(server):
            part.stop()
        for table in (self.refreshers, self.checkers, self.pools):
            table.pop(server, None)
        self.servers.remove(server)
        server.forget_metrics()
        self._health_changed()
        return server

    def status(self):
        return {
            "backend": self.name,
            "balance": self.config.balance,
            "using_backup": self.using_backup(),
            "servers": [s.status() for s in self.servers],
        }

    # Connecting a client

    def connect_to(self, source, fields, connected, failed):
        """Connect a client: `connected((ServerState, BackendSide))` once connected, the
        ServerState acquired (release it when the relay ends), or `failed(failure)`
        (BackendUnavailable), maybe before it returns. Returns what `cancel()` stops (the
        client left: neither is called then) and `called` says has reported. Called, not a
        Deferred's callbacks: this runs for every connection.
        (`fields`, what detection found, matter to NamedServerGroup.)"""
        if self.discovery is not None and not self.discovery.settled:
            return self.connect(source, fields).addCallbacks(connected, failed)
        return _ConnectAttempt(self, source, connected, failed).start()

    def connect(self, source, fields=None):
        """connect_to as a Deferred (cancel it to stop the attempt). With discovery, a
        client that comes before its first look waits for it."""
        if self.discovery is not None and not self.discovery.settled:
            return self.discovery.when_settled().addCallback(lambda _: self.connect(source, fields))
        done = defer.Deferred(lambda _: attempt.cancel())
        attempt = _ConnectAttempt(self, source, done.callback, done.errback).start()
        return done

    def attempt_failed(self, server, attempt, failure):
        reason = failure_reason(failure)
        self.metrics.connect_failures.labels(self.name, server.label, reason).inc()
        self.passive_result(server, False, f"connect {reason}")
        log.info(
            "Backend {backend} server {server} attempt {attempt}/{attempts} failed: {reason}",
            backend=self.name,
            server=server.label,
            attempt=attempt,
            attempts=self.config.retry.attempts,
            reason=reason,
        )

    def pick(self, source):
        """A server for a UDP session (no connect to make), acquired: release it at the end.
        Raises BackendUnavailable."""
        server = self.choose(source, {})
        if server.address is None:
            raise BackendUnavailable(
                self.name, Reason.CONNECT_FAILED, f"{server.label} not resolved"
            )
        server.acquire()
        return server

    def choose(self, source, tried):
        """The primary servers while one is up; the backup tier only while none is (or when
        every primary has failed this client once)."""
        primaries, backups = [], []
        for server in self.servers:
            if server.eligible:
                (backups if server.backup else primaries).append(server)
        if not primaries and not backups:
            raise BackendUnavailable(self.name, Reason.NO_HEALTHY_SERVER)
        limit = self.config.max_connections_per_server
        for tier in (primaries, backups):
            open_servers = tier if limit is None else [s for s in tier if s.active < limit]
            if not open_servers:
                if tier:  # up but full: a full tier does not spill into the next
                    raise BackendUnavailable(self.name, Reason.BACKEND_FULL)
                continue
            untried = [s for s in open_servers if s not in tried] if tried else open_servers
            if untried:
                return self.balancer.choose(untried, source)
            if tier is primaries and any(s not in tried for s in backups):
                continue  # every primary failed this client: on to the backups
            return min(open_servers, key=tried.get)  # every one failed once: the longest ago
        raise BackendUnavailable(self.name, Reason.NO_HEALTHY_SERVER)

    def _health_changed(self):
        """A server's health or state changed: say so when the backup tier takes over or
        stands by again."""
        serving = self.using_backup()
        if serving != self._backup_was_serving:
            self._backup_was_serving = serving
            self._backup_serving.set(1 if serving else 0)
            log.warn(
                "Backend {backend}: the backup tier {state}",
                backend=self.name,
                state="serves (no primary server is up)" if serving else "stands by",
            )

    def using_backup(self):
        """No primary server is up and a backup is: the backup tier serves."""
        return not any(s.eligible for s in self.servers if not s.backup) and any(
            s.eligible for s in self.servers if s.backup
        )

    def take_spare(self, server):
        if server.pool is None:
            return None
        spare = server.pool.take()
        (self._pool_hits if spare is not None else self._pool_misses).inc()
        return spare

    def jittered(self, seconds):
        jitter = self.config.retry.jitter
        return seconds * self.random.uniform(1 - jitter, 1 + jitter)

    def passive_result(self, server, ok, why):
        """What real clients saw: consecutive connect failures and resets count like failed
        checks (only with health checks configured: they are what brings a server back)."""
        checker = self.checkers.get(server)
        if checker is not None:
            checker.record(ok, f"passive: {why}", passive=True)


class _ConnectAttempt:
    """One client's way to a server: the balancer's choice, then failover and retries with
    backoff, each connect an OutboundConnection (this runs for every connection). Reports
    once, to `on_connected` or `on_failed`, unless cancelled first."""

    def __init__(self, group, source, on_connected, on_failed):
        self.group = group
        self.source = source
        self.on_connected = on_connected
        self.on_failed = on_failed
        self.tried = {}  # server -> the attempt that last tried it
        self.attempt = 0
        self.server = None
        self.backend_side = None
        self.connection = None  # the OutboundConnection under way
        self.cancelled = False
        self.pending = None  # the backoff timer
        self.started = 0.0

    def start(self):
        self._try()
        return self

    def _try(self):
        self.pending = None
        group = self.group
        self.attempt += 1
        try:
            server = self.server = group.choose(self.source, self.tried)
        except BackendUnavailable:
            self._report_failure(Failure())
            return
        server.acquire()
        spare = group.take_spare(server)
        if spare is not None:
            self._report_success((server, spare))
            return
        group.metrics.connect_attempts.labels(group.name, server.label).inc()
        self.backend_side = BackendSide()
        self.backend_side.on_connected = self._connected
        self.started = group.reactor.seconds()
        if server.address is None:
            self._failed(Failure(error.DNSLookupError(f"{server.server.host} not resolved yet")))
            return
        self.connection = group.open_connection(
            group.reactor,
            server.address,
            server.server.port,
            self.backend_side,
            self._failed,
            source=self.source if group.config.transparent else None,
        )
        # Its connect_timeout: one of the group's Deadlines, not a DelayedCall of its own.
        group.connect_deadlines.add(self, self._timed_out)

    def _timed_out(self):
        if self.connection is not None:
            self.connection.fail(error.TimeoutError())

    def _connected(self, backend_side):
        backend_side.on_connected = None
        self.connection = None
        self.group.connect_deadlines.remove(self)
        group = self.group
        group._connect_seconds.observe(group.reactor.seconds() - self.started)
        group.passive_result(self.server, True, "connected")
        self.backend_side = None
        self._report_success((self.server, backend_side))

    def _failed(self, reason):
        self.connection = None
        self.backend_side = None
        self.group.connect_deadlines.remove(self)
        server = self.server
        server.release()
        if self.cancelled:
            return  # the client left: not the server's failure
        group = self.group
        self.tried[server] = self.attempt
        group.attempt_failed(server, self.attempt, reason)
        retry = group.config.retry
        if self.attempt >= retry.attempts:
            self._report_failure(
                Failure(
                    BackendUnavailable(
                        group.name,
                        Reason.CONNECT_FAILED,
                        f"{retry.attempts} attempts, last: {reason.getErrorMessage()}",
                    )
                )
            )
            return
        group._retries.inc()
        delay = group.jittered(retry.backoff(self.attempt))
        self.pending = group.reactor.callLater(delay, self._try)

    def _report_success(self, connection):
        report = self.on_connected
        self._let_go()
        report(connection)

    def _report_failure(self, failure):
        report = self.on_failed
        self._let_go()
        report(failure)

    def _let_go(self):
        """Report once, then hold nothing of the client (its methods point back here)."""
        self.on_connected = self.on_failed = None

    @property
    def called(self):
        """It has reported (or was cancelled): as a Deferred's `called`."""
        return self.on_connected is None

    def cancel(self):
        """The client left: stop what is under way, report nothing."""
        if self.called:
            return
        self.cancelled = True
        self._let_go()
        cancel(self.pending)
        if self.connection is not None:
            self.connection.stop()  # calls _failed, which releases
