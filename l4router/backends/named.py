"""A backend whose server the client names: `server_from: "{sni}:443"` (or `{host}`,
`{authority}`), as sniproxy's `*` does, fenced by a required `allow` list.

This must never become an open relay: a name outside `allow` is refused (reason
`name_not_allowed`) before anything is resolved; an allowed name is resolved within
`resolve_timeout` and cached with its TTL (failures too, briefly), the cache bounded; a name
that does not resolve is refused (`name_unresolved`). Metrics are by backend and outcome,
never by name (a client chooses names).
"""

from __future__ import annotations

import collections
import re

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.names import dns

from l4router.backends.discovery import dns_resolver
from l4router.backends.outbound import OutboundConnection, failure_reason
from l4router.connection.reasons import Reason
from l4router.connection.relay import BackendSide
from l4router.errors import BackendUnavailable
from l4router.timers import cancel

log = Logger()

CLIENT_NAMED_REFUSALS = (Reason.NAME_NOT_ALLOWED, Reason.NAME_UNRESOLVED, Reason.NAME_MISSING)
CACHE_SIZE = 4096
MIN_TTL, MAX_TTL = 1.0, 300.0
NEGATIVE_TTL = 5.0  # a name that did not resolve is not asked again before this
_HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)(\.[a-z0-9_]"
    r"([a-z0-9_-]{0,61}[a-z0-9])?)*"
)


class NamedServer:
    """The server a client named: what a relay needs of a server (no health, no metrics)."""

    def __init__(self, group, label):
        self.group = group
        self.label = label
        self.backend = group.name

    def acquire(self):
        self.group.active += 1

    def release(self):
        self.group.active -= 1


class NamedServerGroup:
    """Looks like a BackendGroup to a connection: connect(source, fields)."""

    limit = None  # its `max_connections`, held by each client connected through it

    def __init__(self, backend, reactor, metrics, dns_settings):
        self.config = backend
        self.name = backend.name
        self.reactor = reactor
        self.metrics = metrics
        self.resolver = dns_resolver(dns_settings, reactor)
        self.timeout = backend.resolve_timeout
        self.servers = []  # none of its own: runtime control has nothing to act on
        self.active = 0
        self._cache = collections.OrderedDict()  # name -> (address or None, expiry)
        self._pending = {}  # name -> the Deferreds waiting for its lookup under way
        self._lookups = {
            outcome: metrics.named_lookups.labels(backend.name, outcome)
            for outcome in (
                "cached",
                "resolved",
                Reason.NAME_NOT_ALLOWED,
                Reason.NAME_UNRESOLVED,
                Reason.NAME_MISSING,
            )
        }

    def start(self):
        pass

    def stop(self):
        pass

    def status(self):
        return {
            "backend": self.name,
            "balance": "server_from",
            "using_backup": False,
            "server_from": self.config.server_from,
            "active_connections": self.active,
            "cached_names": len(self._cache),
            "servers": [],
        }

    def passive_result(self, server, ok, why):
        pass  # no health to keep of a name

    def pick(self, source):
        raise BackendUnavailable(self.name, Reason.NAME_MISSING, "server_from is for TCP listeners")

    def connect_to(self, source, fields, connected, failed):
        """BackendGroup.connect_to's contract (a name is resolved first: a Deferred)."""
        return self.connect(source, fields).addCallbacks(connected, failed)

    def connect(self, source, fields=None):
        """Fires with (NamedServer, BackendSide), acquired; fails with BackendUnavailable."""
        try:
            host, port = self._name(fields or {})
        except BackendUnavailable:
            return defer.fail()
        resolving = self._address(host)
        return resolving.addCallback(self._connect, host, port)

    def _name(self, fields):
        """The host name the template makes of `fields` (detected fields and the route's
        named groups), if `allow` lets it through."""
        template = self.config.server_from
        values = {}
        for name in template.names:
            value = fields.get(name)
            if not isinstance(value, str) or not value:
                self._lookups[Reason.NAME_MISSING].inc()
                raise BackendUnavailable(
                    self.name, Reason.NAME_MISSING, f"no {name} to name a server"
                )
            value = value.lower().rstrip(".")
            if name == "host" and ":" in value:  # a Host header's port: the template's counts
                value = value.rsplit(":", 1)[0]
            values[name] = value
        host = template.host.format(**values)
        if not _HOST_NAME.fullmatch(host) or not self.config.allow.matches(host):
            self._lookups[Reason.NAME_NOT_ALLOWED].inc()
            raise BackendUnavailable(self.name, Reason.NAME_NOT_ALLOWED, "a name outside allow")
        return host, template.port

    def _address(self, host):
        now = self.reactor.seconds()
        cached = self._cache.get(host)
        if cached is not None and cached[1] > now:
            self._cache.move_to_end(host)
            self._lookups["cached"].inc()
            return defer.maybeDeferred(self._answer, cached[0], host)
        waiter = defer.Deferred()
        waiters = self._pending.get(host)
        if waiters is None:
            waiters = self._pending[host] = []
            self._lookup(host)
        waiters.append(waiter)
        return waiter.addCallback(self._answer, host)

    @defer.inlineCallbacks
    def _lookup(self, host):
        """Resolve `host` once for every client waiting; the outcome is cached either way."""
        address, ttl = None, NEGATIVE_TTL
        try:
            answers, _, _ = yield self.resolver.lookupAddress(host, timeout=(self.timeout,))
        except Exception:
            answers = []
        records = [a for a in answers if a.type == dns.A]
        if records:
            address = records[0].payload.dottedQuad()
            ttl = min(max(min(r.ttl for r in records), MIN_TTL), MAX_TTL)
        self._lookups["resolved" if address else Reason.NAME_UNRESOLVED].inc()
        self._cache[host] = (address, self.reactor.seconds() + ttl)
        self._cache.move_to_end(host)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        for waiter in self._pending.pop(host, ()):
            if not waiter.called:  # not cancelled by a client that left
                waiter.callback(address)

    def _answer(self, address, host):
        if address is None:
            raise BackendUnavailable(self.name, Reason.NAME_UNRESOLVED, f"{host} has no address")
        return address

    def _connect(self, address, host, port):
        server = NamedServer(self, f"{host}:{port}")
        server.acquire()
        return _OneConnect(server).start(self.reactor, address, port, self.config.connect_timeout)


class _OneConnect:
    """One connect to the named server; cancelling it (the client left) stops it."""

    def __init__(self, server):
        self.server = server
        self.side = BackendSide()
        self.side.on_connected = self.connected
        self.connection = None
        self.timeout = None
        self.cancelled = False
        self.done = defer.Deferred(self._cancel)

    def start(self, reactor, address, port, timeout):
        self.connection = OutboundConnection(reactor, address, port, self.side, self.failed)
        self.timeout = reactor.callLater(timeout, self.connection.fail, error.TimeoutError())
        return self.done

    def _take_done(self):
        """Fired once, then let go of (its canceller is a method of this: a cycle)."""
        done, self.done = self.done, None
        return done

    def _cancel(self, _):
        self.cancelled = True  # the client left: its Deferred gets CancelledError
        self.connection.stop()

    def connected(self, side):
        side.on_connected = None
        cancel(self.timeout)
        self._take_done().callback((self.server, side))

    def failed(self, reason):
        cancel(self.timeout)
        self.server.release()
        if not self.cancelled:
            self._take_done().errback(
                BackendUnavailable(
                    self.server.group.name,
                    Reason.CONNECT_FAILED,
                    f"{self.server.label}: {failure_reason(reason)}",
                )
            )
