"""Builds the running parts from a Config: at start-up, and again on every reload.

What lives across reloads (the metrics registry, the process-wide limit, the history of
closed connections, the installed detectors) is held here; what a config decides (backend
groups, listener factories) is built from it.
"""

import collections

from prometheus_client import CollectorRegistry

from l4router.backends.control import RuntimeState
from l4router.backends.group import BackendGroup
from l4router.backends.named import NamedServerGroup
from l4router.connection.limits import Admission, ChoiceLimits, LocalLimit, NameLimit, Unlimited
from l4router.connection.tcp_listener import ListenerFactory
from l4router.connection.udp import UDPListener, UDPListenerService
from l4router.detection.decision import DetectorSet
from l4router.detection.registry import detectors_for
from l4router.operate.metrics import RouterMetrics
from l4router.process.service import ListenerService
from l4router.process.shared_limits import PROCESS, backend_key, listener_key, route_key

RECENT_CONNECTIONS = 50


def access_log_wanted(config):
    """The access log is info events: with the level above info they would be built only to
    be filtered out, once per connection, so they are not built at all."""
    return config.logging.access_log and config.logging.level in ("debug", "info")


class RouterAssembly:
    def __init__(
        self,
        reactor,
        detectors,
        registry=None,
        inherited_sockets=None,
        standalone=True,
        shared_limits=None,
        runtime=None,
    ):
        """`standalone`: not a worker, so the config and process metrics are this process's.
        `shared_limits`: in a worker, the limits its supervisor shares (WorkerLimits).
        `runtime`: the RuntimeState of servers (a worker's reads its supervisor's file)."""
        self.reactor = reactor
        self.runtime = runtime if runtime is not None else RuntimeState()
        self.detectors = detectors
        self.inherited_sockets = inherited_sockets or {}  # in a worker: description -> fd
        self.standalone = standalone
        self.metrics = RouterMetrics(
            registry if registry is not None else CollectorRegistry(), config_metrics=standalone
        )
        if standalone:
            self.metrics.watch_reactor(reactor)
        self.shared_limits = shared_limits
        self.process_limit = self.shared_limit(PROCESS) or LocalLimit()  # every listener's
        self.recent = collections.deque(maxlen=RECENT_CONNECTIONS)  # closed, newest last
        self.keyed = {}  # route or backend key -> its limit, kept across reloads

    def shared_limit(self, key):
        """In a worker: the shared limit for `key`, or Unlimited (None when not a worker)."""
        if self.shared_limits is None:
            return None
        if self.shared_limits.get(key) is None:
            self.shared_limits.refresh()  # a listener a reload has just added, say
        return self.shared_limits.get(key) or Unlimited()

    def keyed_limit(self, key, maximum):
        """The limit of a route or a backend, at `maximum`: shared with the other workers
        under a supervisor (as the listener's), else this process's."""
        limit = self.keyed.get(key)
        if limit is None:
            limit = self.keyed[key] = self.shared_limit(key) or LocalLimit()
        limit.set_maximum(maximum)
        return limit

    def choice_limits(self, listener, config):
        routes = {
            route.label: self.keyed_limit(
                route_key(listener.name, route.label), route.max_connections
            )
            for route in listener.routes
            if route.max_connections is not None
        }
        names = None
        if listener.max_connections_per_name is not None:
            workers = config.workers if self.shared_limits is not None else 1
            names = NameLimit(listener.max_connections_per_name, workers)
        return ChoiceLimits(routes, names)

    def apply_limits(self, config):
        if self.shared_limits is not None:
            self.shared_limits.refresh()  # the supervisor has adjusted the semaphores
        self.process_limit.set_maximum(config.max_connections)

    def backend_groups(self, config):
        """Groups for `config`, with the runtime changes made so far (l4router.backends.control)."""
        groups = {
            name: NamedServerGroup(backend, self.reactor, self.metrics, config.dns)
            if backend.server_from is not None
            else BackendGroup(backend, self.reactor, self.metrics, dns_settings=config.dns)
            for name, backend in config.backends.items()
        }
        if not self.runtime.writable:
            self.runtime.load()  # a worker: what its supervisor has recorded by now
        self.runtime.apply(groups)
        for name, group in groups.items():
            maximum = config.backends[name].max_connections
            if maximum is not None:
                group.limit = self.keyed_limit(backend_key(name), maximum)
        return groups

    def listener_detectors(self, listener):
        return DetectorSet(
            detectors_for(self.detectors, listener.transport, listener.detect.protocols)
        )

    def listener_service(self, listener, config, groups):
        """A Service that binds and runs one listener, TCP or UDP."""
        factory = self.listener_factory(listener, config, groups)
        kind = UDPListenerService if listener.transport == "udp" else ListenerService
        return kind(
            self.reactor, listener, factory, config.shutdown_timeout, self.inherited_sockets
        )

    def listener_factory(self, listener, config, groups):
        kind = UDPListener if listener.transport == "udp" else ListenerFactory
        return kind(
            listener,
            self.listener_detectors(listener),
            groups,
            Admission(
                self.process_limit,
                listener.max_connections,
                listener.max_connections_per_source,
                listener.ipv6_source_prefix,
                listener=self.shared_limit(listener_key(listener.name)),
            ),
            self.metrics.for_listener(listener.name),
            self.reactor,
            access_log=access_log_wanted(config),
            recent=self.recent,
            choice_limits=self.choice_limits(listener, config),
        )

    def reconfigure_factory(self, factory, listener, config, groups):
        """Keep a listener's sockets and connections; new connections follow `listener`."""
        factory.reconfigure(
            listener,
            self.listener_detectors(listener),
            groups,
            access_log=access_log_wanted(config),
            choice_limits=self.choice_limits(listener, config),
        )
