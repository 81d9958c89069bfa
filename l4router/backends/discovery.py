"""Servers that come from outside the config while the router runs: DNS SRV records
(`servers: {srv: _app._tcp.example.com}`: priorities, weights and ports from the records,
re-resolved when their TTL ends) or a watched file (`servers: {file: PATH}`: a JSON or YAML
list in the config's `servers` syntax, re-read when it changes: the hook for consul-template,
Kubernetes sidecars and the like).

A lookup or a file that fails keeps the last good set; the failure is logged and counted
(`l4router_backend_discovery_failures_total`), and so is every change of the set.
"""

from __future__ import annotations

import os

import yaml
from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns, error

from l4router.config import Server, parse_server
from l4router.timers import cancel

log = Logger()

MIN_TTL, MAX_TTL = 1.0, 300.0  # SRV re-resolution, whatever the records' TTL says
RETRY_AFTER_FAILURE = 5.0
MAX_FILE = 1 << 20
MAX_SERVERS = 1024


class DiscoveryFailed(Exception):
    pass


class _Discovery:
    """Looks again and again; hands every new set of servers to the group."""

    kind = ""

    def __init__(self, group, settings, reactor):
        self.group = group
        self.settings = settings
        self.reactor = reactor
        self.current = None  # the last good set, as a tuple of Servers
        self.settled = False  # the first look is over (found or failed)
        self._waiting = []  # clients that came before it was
        self._call = None
        self._running = False
        metrics = group.metrics
        self._failures = metrics.discovery_failures.labels(group.name)
        self._count = metrics.discovery_servers.labels(group.name)

    def start(self):
        self._running = True
        self._look()

    def stop(self):
        self._running = False
        cancel(self._call)

    def when_settled(self):
        """Fires once the first look is over: a client that comes at start-up waits for the
        servers instead of finding none."""
        if self.settled:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        return waiter

    def _look(self):
        self._call = None
        defer.maybeDeferred(self.look).addCallbacks(self._found, self._failed).addBoth(self._settle)

    def _settle(self, _):
        if not self.settled:
            self.settled = True
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)

    def _found(self, found):
        servers, next_look = found
        if not self._running:
            return
        if servers is not None and servers != self.current:
            log.info(
                "Backend {backend}: {source} gives {count} servers: {servers}",
                backend=self.group.name,
                source=self.describe(),
                count=len(servers),
                servers=", ".join(s.label for s in servers) or "none",
            )
            self.current = servers
            self._count.set(len(servers))
            self.group.replace_servers(servers)
        self._call = self.reactor.callLater(next_look, self._look)

    def _failed(self, failure):
        if not self._running:
            return
        self._failures.inc()
        log.warn(
            "Backend {backend}: {source} failed ({error}); keeping the {count} servers "
            "found before",
            backend=self.group.name,
            source=self.describe(),
            error=failure.getErrorMessage(),
            count=len(self.current or ()),
        )
        self._call = self.reactor.callLater(self.retry_after(), self._look)

    def retry_after(self):
        """How long after a failed look the next one comes."""
        return self.settings.refresh

    def describe(self):
        return f"{self.kind} {self.settings.source}"


class SrvDiscovery(_Discovery):
    """SRV records: the lowest priority is the primary tier, the others the backup tier (our
    model has two); weight 0 counts as 1; targets resolved through the same DNS servers."""

    kind = "srv"

    def retry_after(self):
        return max(self.settings.refresh, RETRY_AFTER_FAILURE)  # a DNS server under strain

    def __init__(self, group, settings, reactor, dns_settings):
        super().__init__(group, settings, reactor)
        self.resolver = dns_resolver(dns_settings, reactor)
        self.timeout = (dns_settings.timeout,)

    @defer.inlineCallbacks
    def look(self):
        try:
            answers, _, additional = yield self.resolver.lookupService(
                self.settings.source, timeout=self.timeout
            )
        except (
            error.DNSNameError,
            error.DNSServerError,
            error.DNSQueryRefusedError,
            defer.TimeoutError,
            error.DNSQueryTimeoutError,
        ) as exc:
            raise DiscoveryFailed(f"SRV lookup: {type(exc).__name__}") from None
        records = [a for a in answers if a.type == dns.SRV][:MAX_SERVERS]
        if not records:
            raise DiscoveryFailed("no SRV records")
        glue = {a.name.name.lower(): a.payload.dottedQuad() for a in additional if a.type == dns.A}
        lowest = min(r.payload.priority for r in records)
        servers = []
        for record in records:
            target = record.payload.target.name.decode("ascii", "replace").rstrip(".").lower()
            address = glue.get(record.payload.target.name.lower())
            if address is None:
                address = yield self._address_of(target)
            servers.append(
                Server(
                    address,
                    record.payload.port,
                    max(1, record.payload.weight),
                    record.payload.priority != lowest,
                )
            )
        ttl = min(r.ttl for r in records)
        return tuple(sorted(set(servers), key=_order)), min(max(ttl, MIN_TTL), MAX_TTL)

    @defer.inlineCallbacks
    def _address_of(self, target):
        try:
            answers, _, _ = yield self.resolver.lookupAddress(target, timeout=self.timeout)
        except Exception as exc:
            raise DiscoveryFailed(f"target {target}: {type(exc).__name__}") from None
        addresses = [a.payload.dottedQuad() for a in answers if a.type == dns.A]
        if not addresses:
            raise DiscoveryFailed(f"target {target} has no A record")
        return addresses[0]


class FileDiscovery(_Discovery):
    """A file re-read whenever its identity (inode, size, mtime) changes: replaced atomically
    by a rename (consul-template) or a symlink swap (a Kubernetes ConfigMap) as well."""

    kind = "file"

    def __init__(self, group, settings, reactor):
        super().__init__(group, settings, reactor)
        self._seen = None  # the identity of the file last read, good or not

    def look(self):
        path = self.settings.source
        try:
            status = os.stat(path)
        except OSError as exc:
            raise DiscoveryFailed(exc.strerror) from None
        identity = (status.st_ino, status.st_size, status.st_mtime_ns)
        if identity == self._seen:
            return None, self.settings.refresh  # unchanged (or still as broken as it was)
        self._seen = identity
        if status.st_size > MAX_FILE:
            raise DiscoveryFailed(f"larger than {MAX_FILE} bytes")
        with open(path, "rb") as stream:
            text = stream.read(MAX_FILE)
        try:
            entries = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as exc:
            raise DiscoveryFailed(f"not YAML or JSON: {str(exc).splitlines()[0]}") from None
        if not isinstance(entries, list) or len(entries) > MAX_SERVERS:
            raise DiscoveryFailed(f"not a list of at most {MAX_SERVERS} servers")
        servers = []
        for index, entry in enumerate(entries):
            try:
                servers.append(parse_server(entry))
            except ValueError as exc:
                raise DiscoveryFailed(f"entry {index}: {exc}") from None
        return tuple(sorted(set(servers), key=_order)), self.settings.refresh


def dns_resolver(dns_settings, reactor):
    """twisted.names asking `dns.servers`, or /etc/hosts then /etc/resolv.conf's servers."""
    if dns_settings.servers:
        return client.Resolver(servers=list(dns_settings.servers), reactor=reactor)
    return client.createResolver()


def _order(server: Server):
    return server.backup, server.label


def discovery_for(group, reactor, dns_settings):
    settings = group.config.discovery
    if settings is None:
        return None
    if settings.kind == "srv":
        return SrvDiscovery(group, settings, reactor, dns_settings)
    return FileDiscovery(group, settings, reactor)
