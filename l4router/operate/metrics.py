"""Prometheus metrics, defined once on a registry the service owns.

Label names are the same words as the access-log fields: listener, protocol, route, backend,
server, reason, direction. On the connection path a metric is a plain Python number until a
scrape (l4router.operate.pending_metrics).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily

from l4router.operate.pending_metrics import Deferring, FlushFirst

DETECTION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 10.0)
UPSTREAM = "upstream"  # client -> backend
DOWNSTREAM = "downstream"  # backend -> client


class RouterMetrics:
    def __init__(self, registry=None, config_metrics=True):
        """`config_metrics`: this process owns the config (a worker's belongs to its
        supervisor)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.pending = []
        r.register(FlushFirst(self.flush))
        self.accepted = Counter(
            "l4router_connections_accepted",
            "Connections admitted by a listener.",
            ["listener"],
            registry=r,
        )
        self.rejected = Counter(
            "l4router_connections_rejected",
            "Connections closed before relaying: limits, reject routes, unreachable backends.",
            ["listener", "reason"],
            registry=r,
        )
        self.active = Gauge(
            "l4router_connections_active",
            "Connections open now (detecting or relaying).",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.routed = Counter(
            "l4router_connections_routed",
            "Decisions: the detected protocol and chosen route.",
            ["listener", "protocol", "route", "backend"],
            registry=r,
        )
        self.closed = Counter(
            "l4router_connections_closed",
            "Connections ended, by close reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.bytes = Counter(
            "l4router_bytes_relayed",
            "Bytes relayed (upstream: client to backend), counted when a connection ends.",
            ["listener", "direction"],
            registry=r,
        )
        self.detection_seconds = Histogram(
            "l4router_detection_seconds",
            "Time from accept to the detection decision.",
            ["listener"],
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "l4router_connections_fallback",
            "Connections sent to a route's fallback backend because its backend had no server up.",
            ["listener", "route", "backend"],
            registry=r,
        )
        self.backup_serving = Gauge(
            "l4router_backend_backup_serving",
            "1 while no primary server of a backend is up and its backup tier serves.",
            ["backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.truncated = Counter(
            "l4router_detection_truncated",
            "Decisions on a first flight cut short (longer than detect.max_bytes, or the "
            "client closed) whose bytes already proved the protocol.",
            ["listener", "protocol"],
            registry=r,
        )
        self.connect_failures = Counter(
            "l4router_backend_connect_failures",
            "Failed connects to backend servers.",
            ["backend", "server", "reason"],
            registry=r,
        )
        self.connect_attempts = Counter(
            "l4router_backend_connect_attempts",
            "Connects attempted for clients.",
            ["backend", "server"],
            registry=r,
        )
        self.connect_seconds = Histogram(
            "l4router_backend_connect_seconds",
            "Time to connect a backend server for a client.",
            ["backend"],
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "l4router_backend_retries",
            "Connect attempts after the first, for one client.",
            ["backend"],
            registry=r,
        )
        self.server_up = Gauge(
            "l4router_backend_server_up",
            "1 while a server is healthy (gets new clients); with workers, in every worker.",
            ["backend", "server"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.discovery_servers = Gauge(
            "l4router_backend_discovery_servers",
            "Servers a backend's discovery (DNS SRV, a watched file) gave last.",
            ["backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.discovery_failures = Counter(
            "l4router_backend_discovery_failures",
            "Discovery lookups or file reads that failed (the last good set was kept).",
            ["backend"],
            registry=r,
        )
        self.named_lookups = Counter(
            "l4router_backend_named_lookups",
            "server_from: names clients gave, by outcome (cached, resolved, name_not_allowed, "
            "name_unresolved, name_missing).",
            ["backend", "outcome"],
            registry=r,
        )
        self.server_admin_state = Gauge(
            "l4router_backend_server_admin_state",
            "1 for the state an operator set a server to (enabled, draining, disabled).",
            ["backend", "server", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.server_active = Gauge(
            "l4router_backend_server_active_connections",
            "Connections to a server: relaying or being connected.",
            ["backend", "server"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.health_checks = Counter(
            "l4router_backend_health_checks",
            "Active health checks by result.",
            ["backend", "server", "result"],
            registry=r,
        )
        self.pool_idle = Gauge(
            "l4router_backend_pool_idle",
            "Spare connections waiting in a server's pool.",
            ["backend", "server"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_requests = Counter(
            "l4router_backend_pool_requests",
            "Clients served from a pool (hit) or not (miss).",
            ["backend", "result"],
            registry=r,
        )

        self.udp_sessions_active = Gauge(
            "l4router_udp_sessions_active",
            "UDP sessions open now.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.udp_sessions_migrated = Counter(
            "l4router_udp_sessions_migrated",
            "QUIC sessions that followed their client to a new address (by connection ID).",
            ["listener"],
            registry=r,
        )
        self.udp_sessions_created = Counter(
            "l4router_udp_sessions_created",
            "UDP sessions by detected protocol.",
            ["listener", "protocol"],
            registry=r,
        )
        self.udp_sessions_ended = Counter(
            "l4router_udp_sessions_ended",
            "UDP sessions ended by reason (idle_timeout is an expiry).",
            ["listener", "reason"],
            registry=r,
        )
        self.udp_datagrams = Counter(
            "l4router_udp_datagrams",
            "Datagrams relayed (upstream: client to backend).",
            ["listener", "direction"],
            registry=r,
        )
        self.udp_dropped = Counter(
            "l4router_udp_datagrams_dropped",
            "Datagrams not relayed, by reason.",
            ["listener", "reason"],
            registry=r,
        )
        for name, value in list(vars(self).items()):
            if isinstance(value, (Counter, Gauge, Histogram)):
                setattr(self, name, Deferring(value, self.pending))
        self.config = ConfigMetrics(r) if config_metrics else None

    def flush(self):
        """Hand every pending update to prometheus-client."""
        for child in self.pending:
            child.flush()

    def watch_reactor(self, reactor):
        """Process and reactor gauges, read at scrape time: open fds, RSS, CPU (the standard
        process_* metrics) and pending timers, where a leak would show."""
        ProcessCollector(registry=self.registry)
        self.registry.register(_ReactorCollector(reactor))

    def watch_worker(self, reactor, index):
        """In a worker, the same gauges, one series per worker (see WorkerGauges)."""
        return WorkerGauges(self.registry, reactor, str(index))

    def for_listener(self, name):
        return ListenerMetrics(self, name)


class WorkerGauges:
    """A worker's process gauges. Its supervisor serves /metrics from files, so they cannot be
    read at scrape time: `sample()` runs every few seconds. One series per worker, since a sum
    of RSS or of pending timers over workers would say nothing."""

    FROM_PROCESS = {
        "process_resident_memory_bytes": (
            "l4router_worker_resident_memory_bytes",
            "Resident memory of a worker.",
        ),
        "process_open_fds": ("l4router_worker_open_fds", "Open file descriptors of a worker."),
        "process_cpu_seconds": ("l4router_worker_cpu_seconds", "CPU time used by a worker."),
    }

    def __init__(self, registry, reactor, worker):
        self.reactor = reactor
        self.process = ProcessCollector(registry=None)
        self.gauges = {
            source: Gauge(
                name, text, ["worker"], registry=registry, multiprocess_mode="liveall"
            ).labels(worker)
            for source, (name, text) in self.FROM_PROCESS.items()
        }
        self.delayed_calls = Gauge(
            "l4router_worker_reactor_delayed_calls",
            "Timers pending in a worker's reactor.",
            ["worker"],
            registry=registry,
            multiprocess_mode="liveall",
        ).labels(worker)

    def sample(self):
        for family in self.process.collect():
            gauge = self.gauges.get(family.name)
            if gauge is not None and family.samples:
                gauge.set(family.samples[0].value)
        self.delayed_calls.set(len(self.reactor.getDelayedCalls()))


class ConfigMetrics:
    """Which config is in use and how reloads went: kept by whoever reads the config file."""

    def __init__(self, registry):
        self.info = Gauge(
            "l4router_config_info",
            "1 for the config in use, labelled by its sha256.",
            ["sha256"],
            registry=registry,
        )
        self.reload_success = Gauge(
            "l4router_config_last_reload_success",
            "1 if the last reload succeeded, else 0.",
            registry=registry,
        )
        self.reload_time = Gauge(
            "l4router_config_last_reload_timestamp_seconds",
            "When the last reload was tried.",
            registry=registry,
        )
        self.reloads = Counter(
            "l4router_config_reloads",
            "Reloads by result (success, failure).",
            ["result"],
            registry=registry,
        )
        self.runtime_changes = Counter(
            "l4router_runtime_changes",
            "Changes to backend servers made at run time (admin site, l4router-ctl), by action.",
            ["action"],
            registry=registry,
        )
        self.reload_success.set(1)
        self._digest = None

    def loaded(self, digest):
        if self._digest is not None and self._digest != digest:
            self.info.remove(self._digest)
        self._digest = digest
        self.info.labels(digest).set(1)

    def reloaded(self, success, when):
        self.reload_success.set(1 if success else 0)
        self.reload_time.set(when)
        self.reloads.labels("success" if success else "failure").inc()


class ListenerMetrics:
    """One listener's label children, looked up once instead of on every connection."""

    def __init__(self, metrics, listener):
        self.metrics = metrics
        self.listener = listener
        self.accepted = metrics.accepted.labels(listener)
        self.active = metrics.active.labels(listener)
        self.detection_seconds = metrics.detection_seconds.labels(listener)
        self.bytes_up = metrics.bytes.labels(listener, UPSTREAM)
        self.bytes_down = metrics.bytes.labels(listener, DOWNSTREAM)
        self.udp_sessions_active = metrics.udp_sessions_active.labels(listener)
        self.udp_migrated = metrics.udp_sessions_migrated.labels(listener)
        self.udp_datagrams_up = metrics.udp_datagrams.labels(listener, UPSTREAM)
        self.udp_datagrams_down = metrics.udp_datagrams.labels(listener, DOWNSTREAM)
        self._rejected = {}
        self._closed = {}
        self._routed = {}

    def rejected(self, reason):
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self.metrics.rejected.labels(self.listener, reason)
        return child

    def closed(self, reason):
        child = self._closed.get(reason)
        if child is None:
            child = self._closed[reason] = self.metrics.closed.labels(self.listener, reason)
        return child

    def fallback(self, route, backend):
        return self.metrics.fallbacks.labels(self.listener, route, backend)

    def truncated(self, protocol):
        return self.metrics.truncated.labels(self.listener, protocol)

    def udp_created(self, protocol):
        return self.metrics.udp_sessions_created.labels(self.listener, protocol)

    def udp_ended(self, reason):
        return self.metrics.udp_sessions_ended.labels(self.listener, reason)

    def udp_dropped(self, reason):
        return self.metrics.udp_dropped.labels(self.listener, reason)

    def routed(self, protocol, route, backend):
        key = (protocol, route, backend)
        child = self._routed.get(key)
        if child is None:
            child = self._routed[key] = self.metrics.routed.labels(self.listener, *key)
        return child


class _ReactorCollector:
    def __init__(self, reactor):
        self.reactor = reactor

    def collect(self):
        yield GaugeMetricFamily(
            "l4router_reactor_delayed_calls",
            "Timers pending in the reactor (a leak grows this).",
            value=len(self.reactor.getDelayedCalls()),
        )
