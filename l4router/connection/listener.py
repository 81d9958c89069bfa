"""What a listener of either transport keeps between connections: its config, detectors,
routes, backends and limits (all swapped by a reload), and the counters the status page shows."""

import collections

from twisted.logger import Logger

from l4router.connection.limits import ChoiceLimits
from l4router.connection.relay import IdleSweeper
from l4router.connection.routing import RouteTable
from l4router.timers import Deadlines

log = Logger()
access_log = Logger(namespace="l4router.access")

# The access log's line for an ended TCP connection and an ended UDP session (the event
# carries every field of the record either way; logging.format: json writes them all).
ACCESS_LINES = {
    "tcp": "{listener} #{connection_id} {source}:{source_port} {protocol} route={route} "
    "backend={backend} server={server} bytes_up={bytes_up} bytes_down={bytes_down} "
    "duration={duration:.3f}s reason={reason}",
    "udp": "{listener} udp#{connection_id} {source}:{source_port} {protocol} route={route} "
    "backend={backend} server={server} datagrams_up={datagrams_up} "
    "datagrams_down={datagrams_down} bytes_up={bytes_up} bytes_down={bytes_down} "
    "duration={duration:.3f}s reason={reason}",
}

REFUSAL_LOG_INTERVAL = 10.0


class RateLimitedLog:
    """At most one log line per key and interval, saying how many events it stands for: a
    flood of refused connections must not become a flood of log lines."""

    def __init__(self, clock, interval):
        self.clock = clock
        self.interval = interval
        self.counts = collections.Counter()
        self.last = {}

    def event(self, key, emit):
        self.counts[key] += 1
        now = self.clock.seconds()
        if now - self.last.get(key, -self.interval) >= self.interval:
            emit(key, self.counts.pop(key))
            self.last[key] = now


class ListenerRuntime:
    def __init__(
        self,
        listener,
        detectors,
        backends,
        admission,
        metrics,
        clock,
        access_log=True,
        recent=None,
        choice_limits=None,
    ):
        self.name = listener.name
        self.admission = admission
        self.metrics = metrics
        self.clock = clock
        self.recent = recent if recent is not None else []
        self.accepted_total = 0
        self.refused_total = 0
        self.bytes_closed = 0  # relayed by connections or sessions that have ended, both ways
        self.idle_sweeper = None
        self.detect_deadlines = None
        self.refusals = RateLimitedLog(clock, REFUSAL_LOG_INTERVAL)
        self.reconfigure(listener, detectors, backends, access_log, choice_limits)

    def log_refusals(self, reason, count):
        log.warn(
            "Listener {listener} refused {count} connections ({reason}) in the last "
            "{interval:.0f}s",
            listener=self.name,
            count=count,
            reason=reason,
            interval=REFUSAL_LOG_INTERVAL,
        )

    def record_end(self, record):
        """A connection's or a UDP session's end (its `describe()` and `reason`), written
        once for both transports: the counters, the recent ends the status page shows, the
        access-log event."""
        metrics = self.metrics
        reason = record["reason"]
        if record["transport"] == "tcp":
            metrics.closed(reason).inc()
        else:
            metrics.udp_ended(reason).inc()
        metrics.bytes_up.inc(record["bytes_up"])
        metrics.bytes_down.inc(record["bytes_down"])
        self.bytes_closed += record["bytes_up"] + record["bytes_down"]
        self.recent.append(record)
        if self.access_log:
            access_log.info(ACCESS_LINES[record["transport"]], **record)

    def reconfigure(self, listener, detectors, backends, access_log=True, choice_limits=None):
        """New connections follow this listener config; open ones keep going as they are."""
        self.listener = listener
        self.choice_limits = choice_limits or ChoiceLimits()
        self.detectors = detectors
        self.routes = RouteTable(listener)
        self.backends = backends
        self.access_log = access_log
        if self.idle_sweeper is None or self.idle_sweeper.timeout != listener.idle_timeout:
            # Open ones keep theirs.
            self.idle_sweeper = IdleSweeper(self.clock, listener.idle_timeout)
        timeout = listener.detect.timeout
        if self.detect_deadlines is None or self.detect_deadlines.timeout != timeout:
            self.detect_deadlines = Deadlines(self.clock, timeout)  # open ones keep theirs
        self.admission.configure(
            listener.max_connections,
            listener.max_connections_per_source,
            listener.ipv6_source_prefix,
            listener.rate_per_source,
        )
