"""What a listener of either transport keeps between connections: its config, detectors,
routes, backends and limits (all swapped by a reload), and the counters the status page shows."""

from l4router.relay import IdleSweeper
from l4router.routing import RouteTable


class ListenerRuntime:
    def __init__(self, listener, detectors, backends, admission, metrics, clock,
                 access_log=True, recent=None):
        self.name = listener.name
        self.admission = admission
        self.metrics = metrics
        self.clock = clock
        self.recent = recent if recent is not None else []
        self.accepted_total = 0
        self.refused_total = 0
        self.bytes_closed = 0  # relayed by connections or sessions that have ended, both ways
        self.idle_sweeper = None
        self.reconfigure(listener, detectors, backends, access_log)

    def reconfigure(self, listener, detectors, backends, access_log=True):
        """New connections follow this listener config; open ones keep going as they are."""
        self.listener = listener
        self.detectors = detectors
        self.routes = RouteTable(listener)
        self.backends = backends
        self.access_log = access_log
        if self.idle_sweeper is None or self.idle_sweeper.timeout != listener.idle_timeout:
            self.idle_sweeper = IdleSweeper(self.clock, listener.idle_timeout)  # open ones keep theirs
        self.admission.configure(listener.max_connections, listener.max_connections_per_source)
