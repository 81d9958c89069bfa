"""A listener's route table: ordered match rules -> backend name or reject."""

from __future__ import annotations

import collections
import ipaddress

import attrs

from l4router.detection.decision import TIMEOUT

DEFAULT_ROUTE = "default"
TIMEOUT_ROUTE = "on_timeout"


@attrs.frozen
class RouteChoice:
    route: str  # label for metrics and logs
    backend: str | None  # None: reject
    fallback: str | None = None  # used while `backend` has no server up


class RouteTable:
    """First match wins; `default` when none matches; `on_timeout` for silent clients."""

    def __init__(self, listener):
        self.routes = listener.routes
        self.default = RouteChoice(DEFAULT_ROUTE, listener.default)
        self.on_timeout = RouteChoice(TIMEOUT_ROUTE, listener.on_timeout)
        self.choices = [
            RouteChoice(route.label, route.backend, route.fallback) for route in self.routes
        ]
        self.hits = collections.Counter()  # route label -> connections, for the status page
        # The client's address is parsed only when a route matches on it.
        self.matches_source = any(route.match.sources is not None for route in self.routes)

    def choose(self, decision, source_host):
        choice = self._choose(decision, source_host)
        self.hits[choice.route] += 1
        return choice

    def captures(self, label, decision):
        """The named groups of the regular expressions of the route called `label`."""
        route = next((r for r in self.routes if r.label == label), None)
        return {} if route is None else _captures(route, decision)

    def _choose(self, decision, source_host):
        if decision.protocol == TIMEOUT:
            return self.on_timeout
        source = _address(source_host) if self.matches_source else None
        for route, choice in zip(self.routes, self.choices):
            if _matches(route.match, decision, source):
                return choice
        return self.default


def _captures(route, decision):
    """The named groups of `route`'s regular expressions on the fields they matched (to name
    a server: `server_from: "{tenant}.internal:443"`)."""
    found = {}
    for name, globs in route.match.fields:
        value = decision.fields.get(name)
        values = value if isinstance(value, tuple) else (value,)
        for one in values:
            matched = globs.regex.match(str(one)) if one is not None else None
            if matched is not None:
                found.update({k: v for k, v in matched.groupdict().items() if v is not None})
                break
    return found


def _address(host):
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except (ValueError, AttributeError):
        return None


def _matches(match, decision, source):
    if match.protocols is not None and decision.protocol not in match.protocols:
        return False
    if match.sources is not None:
        if source is None or not any(source in network for network in match.sources):
            return False
    fields = decision.fields
    for name, globs in match.fields:
        value = fields.get(name)
        if value is None or not globs.matches(value):
            return False
    return True
