"""What the admin site shows: listeners, routes, backends, connections, as plain data."""

from twisted.internet.task import LoopingCall

THROUGHPUT_INTERVAL = 5.0


class ThroughputMeter:
    """Samples each listener's relayed bytes every few seconds: bytes per second, recent."""

    def __init__(self, router, interval=THROUGHPUT_INTERVAL):
        self.router = router
        self.interval = interval
        self.previous = {}
        self.rates = {}
        self.loop = LoopingCall(self.sample)
        self.loop.clock = router.reactor

    def start(self):
        self.loop.start(self.interval, now=True)

    def stop(self):
        if self.loop.running:
            self.loop.stop()

    def sample(self):
        now = self.router.reactor.seconds()
        for service in self.router.listeners:
            total = service.factory.bytes_relayed()
            before = self.previous.get(service.name)
            if before is not None and now > before[0]:
                self.rates[service.name] = (total - before[1]) / (now - before[0])
            self.previous[service.name] = (now, total)


def listeners(router, throughput):
    rows = []
    for service in router.listeners:
        factory = service.factory
        table = factory.routes
        routes = [
            {
                "route": choice.route,
                "backend": choice.backend or "reject",
                "hits": table.hits[choice.route],
            }
            for choice in (*table.choices, table.default, table.on_timeout)
        ]
        rows.append(
            {
                "listener": service.name,
                "addresses": service.addresses(),
                "detectors": list(factory.detectors.names),
                "active_connections": len(factory.connections),
                "accepted": factory.accepted_total,
                "refused": factory.refused_total,
                "bytes_per_second": round(throughput.rates.get(service.name, 0.0)),
                "routes": routes,
            }
        )
    return rows


def connections(router):
    now = router.reactor.seconds()
    live = [c.describe(now) for service in router.listeners for c in service.factory.connections]
    return sorted(live, key=lambda c: c["connection_id"])


def recent(router):
    return list(reversed(router.assembly.recent))


def overview(router, throughput):
    state = "draining" if router.draining else "ready" if router.ready else "starting"
    return {
        "ready": router.ready,
        "state": state,
        "config": router.config.source,
        "config_sha256": router.config.digest,
        "listeners": listeners(router, throughput),
        "backends": router.backends.status(),
        "recent_connections": recent(router),
    }
