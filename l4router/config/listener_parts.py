"""The `listeners` section: addresses, detection, limits and the route table, with the
checks that a route can match and is not shadowed."""

from __future__ import annotations

from l4router.config.endpoints import listen_description, split_host_port
from l4router.config.model import (
    DEFAULT_DETECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_IPV6_SOURCE_PREFIX,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_SOURCE,
    DEFAULT_UDP_IDLE_TIMEOUT,
    FIELD_NAME_RE,
    REJECT,
    RELAY_MODES,
    TRANSPORTS,
    DetectSettings,
    GlobSet,
    Listener,
    Route,
    RouteMatch,
)
from l4router.config.reader import _MISSING, _Invalid, _kind
from l4router.config.values import (
    _boolean,
    _limit,
    _name,
    _networks,
    _number_in,
    _one_of,
    _patterns,
    _positive_duration,
    _positive_int,
    _rate_limit,
    _string_list,
    _trusted_senders,
)
from l4router.parsers.proxyprotocol import PP_FIELDS


class ListenerParts:
    """_Builder's reading of listeners and routes (a mixin)."""

    def listeners(self, top, backends):
        raw = top.get("listeners", lambda v: v)
        if raw is _MISSING:
            return ()
        if not isinstance(raw, list) or not raw:
            self.reader.problem("listeners", "must be a non-empty list of listeners")
            return ()
        listeners = []
        seen = {}
        for index, item in enumerate(raw):
            path = f"listeners[{index}]"
            listener = self.listener(item, path, backends)
            if listener is None:
                continue
            if listener.name in seen:
                self.reader.problem(
                    f"{path}.name",
                    f"duplicate listener name {listener.name!r} "
                    f"(also listeners[{seen[listener.name]}])",
                )
                continue
            seen[listener.name] = index
            listeners.append(listener)
        return tuple(listeners)

    def listener(self, raw, path, backends):
        section = self.reader.section(raw, path)
        if section is None:
            return None
        name = section.get("name", _name)
        transport = section.get("transport", _one_of(TRANSPORTS), "tcp")
        self.transport = transport if transport is not _MISSING else "tcp"
        udp = self.transport == "udp"
        listen = section.get("listen", self.udp_listen if udp else self.listen_list)
        detect = self.detect(section)
        # The same limits, in the words of each transport: connections or sessions.
        unit = "sessions" if udp else "connections"
        for other in {"connections", "sessions"} - {unit}:
            for key in (f"max_{other}", f"max_{other}_per_source"):
                if section.has(key):
                    section.used.add(key)
                    self.reader.problem(
                        section.key_path(key),
                        f"is for {'udp' if other == 'sessions' else 'tcp'} "
                        f"listeners; this one is {self.transport}",
                    )
        max_connections = section.get(f"max_{unit}", _limit, DEFAULT_MAX_SESSIONS if udp else None)
        per_source = section.get(
            f"max_{unit}_per_source", _limit, DEFAULT_MAX_SESSIONS_PER_SOURCE if udp else None
        )
        ipv6_prefix = section.get(
            "ipv6_source_prefix", _number_in(1, 128), DEFAULT_IPV6_SOURCE_PREFIX
        )
        rate = section.get("rate_per_source", _rate_limit, None)
        idle_timeout = section.get(
            "idle_timeout",
            _positive_duration,
            DEFAULT_UDP_IDLE_TIMEOUT if udp else DEFAULT_IDLE_TIMEOUT,
        )
        accept_proxy = ()
        relay = "splice"
        per_name = None
        if not udp:
            accept_proxy = section.get("accept_proxy_protocol", _trusted_senders, ())
            relay = section.get("relay", _one_of(RELAY_MODES), "splice")
            per_name = section.get("max_connections_per_name", _positive_int, None)
        routes = self.routes(section, backends, proxied=bool(accept_proxy))
        if udp and routes is not _MISSING:
            for index, route in enumerate(routes):
                if route.max_connections is not None:
                    self.reader.problem(
                        section.key_path(f"routes[{index}].max_connections"),
                        "is for tcp listeners (UDP sessions: max_sessions)",
                    )
        target = self.target(backends)
        default = section.get("default", target, None)
        on_timeout = section.get("on_timeout", target, default)
        section.finish()
        values = (
            name,
            transport,
            listen,
            detect,
            max_connections,
            per_source,
            idle_timeout,
            routes,
            default,
            on_timeout,
            accept_proxy,
            relay,
            ipv6_prefix,
            rate,
            per_name,
        )
        if _MISSING in values:
            return None
        return Listener(
            name=name,
            transport=transport,
            listen=listen,
            detect=detect,
            max_connections=max_connections,
            max_connections_per_source=per_source,
            idle_timeout=idle_timeout,
            routes=routes,
            on_timeout=on_timeout,
            default=default,
            accept_proxy_protocol=accept_proxy,
            relay=relay,
            ipv6_source_prefix=ipv6_prefix,
            rate_per_source=rate,
            max_connections_per_name=per_name,
        )

    @staticmethod
    def listen_list(value):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise _Invalid(f"must be an endpoint string or a list of them, not {value!r}")
        return tuple(listen_description(v) for v in values)

    @staticmethod
    def udp_listen(value):
        """A UDP listener has one host:port (its sessions answer from that socket)."""
        if not isinstance(value, str):
            raise _Invalid(f"a udp listener takes one host:port, not {value!r}")
        host, port = split_host_port(value)
        host = "" if host == "*" else host
        return (f"udp:{port}" + (f":interface={host.replace(':', chr(92) + ':')}" if host else ""),)

    def detect(self, listener):
        raw = listener.get("detect", lambda v: v, {})
        section = self.reader.section(raw, listener.key_path("detect"))
        if section is None:
            return _MISSING
        protocols = section.get("protocols", self.protocol_names, None)
        timeout = section.get("timeout", _positive_duration, DEFAULT_DETECT_TIMEOUT)
        max_bytes = section.get("max_bytes", _positive_int, DEFAULT_MAX_BYTES)
        section.finish()
        if _MISSING in (protocols, timeout, max_bytes):
            return _MISSING
        return DetectSettings(protocols, timeout, max_bytes)

    def protocol_names(self, value, allow_unknown=False):
        names = _string_list(value)
        transport = getattr(self, "transport", "tcp")
        allowed = {name for name, d in self.detectors.items() if transport in d.transports}
        allowed |= {"unknown"} if allow_unknown else set()
        for name in names:
            if name not in allowed:
                raise _Invalid(
                    f"no installed {transport} detector is called {name!r} "
                    f"(installed: {', '.join(sorted(allowed))})"
                )
        return names

    def target(self, backends):
        def convert(value):
            if value is None or value == REJECT:
                return None
            if not isinstance(value, str):
                raise _Invalid(f"must be a backend name or {REJECT!r}, not {value!r}")
            if value not in backends:
                raise _Invalid(
                    f"no backend is called {value!r} "
                    f"(defined: {', '.join(sorted(backends)) or 'none'})"
                )
            return value

        return convert

    def routes(self, listener, backends, proxied):
        raw = listener.get("routes", lambda v: v, [])
        if raw is _MISSING:
            return _MISSING
        if not isinstance(raw, list):
            self.reader.problem(listener.key_path("routes"), f"must be a list, not {_kind(raw)}")
            return _MISSING
        routes = []
        for index, item in enumerate(raw):
            path = listener.key_path(f"routes[{index}]")
            route = self.route(item, path, index, backends, proxied)
            routes.append(route)
        if None in routes:
            return _MISSING
        for index, route in enumerate(routes):
            earlier = next((e for e in routes[:index] if shadows(e.match, route.match)), None)
            if earlier is not None:
                self.warnings.append(
                    f"{listener.key_path(f'routes[{index}]')}: never matches: {earlier.label} "
                    "before it matches every connection it would"
                )
        return tuple(routes)

    def route(self, raw, path, index, backends, proxied):
        section = self.reader.section(raw, path)
        if section is None:
            return None
        label = section.get("name", _name, f"routes[{index}]")
        match = self.match(section, proxied)
        backend = section.get("backend", self.target(backends), None)
        reject = section.get("reject", _boolean, False)
        fallback = section.get("fallback", self.target(backends), None)
        maximum = section.get("max_connections", _positive_int, None)
        section.finish()
        if section.has("backend") == bool(reject):
            self.reader.problem(path, "needs exactly one of backend: NAME or reject: true")
            return None
        if section.has("fallback") and (reject or fallback is None or fallback == backend):
            self.reader.problem(
                f"{path}.fallback", "names another backend, for a route to a backend"
            )
            return None
        if _MISSING in (label, match, fallback, maximum) or (
            section.has("backend") and backend is _MISSING
        ):
            return None
        return Route(label, match, None if reject else backend, fallback, maximum)

    def match(self, route, proxied):
        """`proxied`: the listener accepts PROXY headers, whose TLVs give pp_* fields."""
        raw = route.get("match", lambda v: v, {})
        section = self.reader.section(raw, route.key_path("match"))
        if section is None:
            return _MISSING
        problems_before = len(self.reader.problems)
        protocols = section.get("protocol", lambda v: frozenset(self.protocol_names(v, True)), None)
        sources = section.get("source", _networks, None)
        fields = []
        for key in list(section.raw):
            if key in ("protocol", "source"):
                continue
            section.used.add(key)
            field_path = section.key_path(str(key))
            if not isinstance(key, str) or not FIELD_NAME_RE.match(key):
                self.reader.problem(
                    field_path, "a field name is lower-case letters, digits and '_'"
                )
                continue
            if key in PP_FIELDS:
                if not proxied:
                    self.reader.problem(
                        field_path,
                        f"{key} comes from a PROXY v2 header: the "
                        "listener needs accept_proxy_protocol",
                    )
                    continue
            elif self.known_fields is not None and key not in self.known_fields:
                self.reader.problem(
                    field_path,
                    f"no installed detector produces field {key!r} "
                    f"(known: {', '.join(sorted(self.known_fields))})",
                )
                continue
            never = key not in PP_FIELDS and self.never_produced(protocols, key)
            if never:
                self.reader.problem(
                    field_path,
                    f"protocol {never} never produces field {key!r}: this route could never match",
                )
                continue
            patterns = self.reader.convert(section.raw[key], field_path, _patterns)
            if patterns is not _MISSING:
                fields.append((key, GlobSet.of(patterns)))
        section.finish()
        if len(self.reader.problems) > problems_before:
            return _MISSING
        return RouteMatch(protocols, sources, tuple(fields))

    def never_produced(self, protocols, field):
        """The protocols of a match, named as a user would read them, when none of them can
        produce `field` (`{protocol: ssh, sni: ...}`); '' when one can or it cannot be told
        (a detector that does not declare its fields may produce any)."""
        if not protocols or protocols is _MISSING:
            return ""
        producers = [self.detectors.get(name) for name in protocols]
        declared = [d.fields if d is not None else () for d in producers]
        if any(fields is None or field in fields for fields in declared):
            return ""
        return " or ".join(sorted(protocols))


def shadows(first, later):
    """`first` matches every connection `later` matches, so a route with `later` after one
    with `first` is never reached: every key of `first` is in `later`, no wider."""
    if first.protocols is not None and (
        later.protocols is None or not later.protocols <= first.protocols
    ):
        return False
    if first.sources is not None and (
        later.sources is None
        or not all(
            any(net.version == wide.version and net.subnet_of(wide) for wide in first.sources)
            for net in later.sources
        )
    ):
        return False
    later_fields = dict(later.fields)
    for name, globs in first.fields:
        narrower = later_fields.get(name)
        if narrower is None or not all(_within(pattern, globs) for pattern in narrower.patterns):
            return False
    return True


def _within(pattern, globs):
    """Every value `pattern` matches, `globs` matches too (told for the same pattern, for a
    plain name, and for a `*` that takes anything)."""
    if pattern in globs.patterns or "*" in globs.patterns:
        return True
    return not any(c in pattern for c in "*?[") and globs.matches(pattern)
