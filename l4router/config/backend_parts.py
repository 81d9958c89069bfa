"""The `backends` section: servers or where they come from, balancing, retries, health
checks, pools, limits."""

from __future__ import annotations

from collections.abc import Mapping

from l4router.backends.probes import PROBES
from l4router.config.model import (
    BALANCE_POLICIES,
    DEFAULT_CONNECT_TIMEOUT,
    REJECT,
    Backend,
    GlobSet,
    HealthCheckSettings,
    PoolSettings,
    QuicLb,
    RetrySettings,
)
from l4router.config.reader import _ABSENT, _MISSING
from l4router.config.values import (
    _boolean,
    _bytes_to_send,
    _discovery,
    _host_name,
    _http_path,
    _name,
    _non_negative_int,
    _number,
    _one_of,
    _patterns,
    _positive_duration,
    _positive_int,
    _proxy_protocol_out,
    _quic_lb,
    _safe_regex,
    _server_from,
    _status_classes,
    parse_duration,
    parse_server,
)


class BackendParts:
    """_Builder's reading of backends (a mixin: it shares the reader and the detectors)."""

    def backends(self, top):
        raw = top.get("backends", lambda v: v, {})
        section = self.reader.section(raw, "backends")
        backends = {}
        if section is None:
            return backends
        for name in list(section.raw):
            path = section.key_path(str(name))
            section.used.add(name)
            if self.reader.convert(name, path, _name) is _MISSING:
                continue
            if name == REJECT:
                self.reader.problem(path, f"{REJECT!r} is reserved for rejecting connections")
                continue
            backend = self.backend(name, section.raw[name], path)
            if backend is not None:
                backends[name] = backend
        return backends

    def backend(self, name, raw, path):
        section = self.reader.section(raw, path)
        if section is None:
            return None
        named = self.named_server(section, path, raw if isinstance(raw, Mapping) else {})
        servers = section.get("servers", lambda v: v, () if named else _MISSING)
        parsed = []
        discovery = None
        if isinstance(servers, Mapping):
            discovery = self.reader.convert(servers, f"{path}.servers", _discovery)
        elif servers is not _MISSING and not named:
            if not isinstance(servers, list) or not servers:
                self.reader.problem(
                    section.key_path("servers"),
                    "must be a non-empty list of host:port, {srv: NAME} or {file: PATH}",
                )
            else:
                for index, server in enumerate(servers):
                    parsed.append(
                        self.reader.convert(server, f"{path}.servers[{index}]", parse_server)
                    )
        balance = section.get("balance", _one_of(BALANCE_POLICIES), "round_robin")
        connect_timeout = section.get(
            "connect_timeout", _positive_duration, DEFAULT_CONNECT_TIMEOUT
        )
        retry = self.settings(
            section,
            "retry",
            RetrySettings,
            {
                "attempts": _positive_int,
                "initial_backoff": parse_duration,
                "max_backoff": parse_duration,
                "multiplier": _number(1.0, 100.0),
                "jitter": _number(0.0, 1.0),
            },
            RetrySettings(),
        )
        health = self.health_check(section, path)
        pool = self.settings(
            section,
            "pool",
            PoolSettings,
            {
                "min_idle": _non_negative_int,
                "max_idle": _non_negative_int,
                "idle_timeout": _positive_duration,
                "max_lifetime": _positive_duration,
            },
            PoolSettings(),
        )
        if isinstance(pool, PoolSettings) and pool.max_idle < pool.min_idle:
            self.reader.problem(
                f"{path}.pool.max_idle", f"must be at least min_idle ({pool.min_idle})"
            )
            pool = _MISSING
        per_server = section.get("max_connections_per_server", _positive_int, None)
        maximum = section.get("max_connections", _positive_int, None)
        transparent = section.get("transparent", _boolean, False)
        if transparent is True and isinstance(pool, PoolSettings) and pool.min_idle:
            self.reader.problem(
                f"{path}.transparent",
                "cannot go with pool.min_idle: a spare "
                "connection is made before there is a client to send it from",
            )
            transparent = _MISSING
        proxy_protocol = section.get("proxy_protocol", _proxy_protocol_out, ("none", ()))
        quic_lb = section.get("quic_lb", _quic_lb, None)
        section.finish()
        if isinstance(quic_lb, QuicLb) and _MISSING not in parsed:
            quic_lb = self.quic_lb_ids(f"{path}.servers", quic_lb, parsed)
        values = (
            balance,
            connect_timeout,
            retry,
            health,
            pool,
            per_server,
            proxy_protocol,
            discovery,
            named,
            maximum,
            transparent,
            quic_lb,
        )
        if _MISSING in parsed or not (parsed or discovery or named) or _MISSING in values:
            return None
        version, tlvs = proxy_protocol
        server_from, allow, resolve_timeout = named or (None, None, 1.0)
        return Backend(
            name,
            tuple(parsed),
            balance,
            connect_timeout,
            retry,
            health,
            pool,
            max_connections_per_server=per_server,
            max_connections=maximum,
            proxy_protocol=version,
            proxy_tlvs=tlvs,
            discovery=discovery,
            server_from=server_from,
            allow=allow,
            resolve_timeout=resolve_timeout,
            transparent=transparent,
            quic_lb=quic_lb,
        )

    def quic_lb_ids(self, path, quic_lb, servers):
        """With quic_lb, every server has an ID of the configured length, each its own."""
        seen = {}
        for index, server in enumerate(servers):
            key = f"{path}[{index}].quic_lb_id"
            if server.quic_lb_id is None or len(server.quic_lb_id) != quic_lb.server_id_length:
                self.reader.problem(
                    key,
                    f"quic_lb needs an ID of {quic_lb.server_id_length} octets for every server",
                )
                return _MISSING
            if server.quic_lb_id in seen:
                self.reader.problem(key, f"the same ID as servers[{seen[server.quic_lb_id]}]")
                return _MISSING
            seen[server.quic_lb_id] = index
        return quic_lb

    def named_server(self, section, path, servers):
        """`server_from` with its required `allow` (and `resolve_timeout`), or None."""
        template = section.get("server_from", _server_from, None)
        allow = section.get("allow", lambda v: GlobSet.of(_patterns(v)), None)
        resolve_timeout = section.get("resolve_timeout", _positive_duration, 1.0)
        if template is None:
            if allow is not None:
                self.reader.problem(f"{path}.allow", "is for server_from only")
            return None
        if _MISSING in (template, allow, resolve_timeout):
            return _MISSING
        if allow is None:
            self.reader.problem(
                f"{path}.allow",
                "server_from needs the names it may take "
                "(a list of patterns): without it the router is an open relay",
            )
            return _MISSING
        for key in ("servers", "health_check", "pool"):
            if key in servers:
                self.reader.problem(
                    f"{path}.{key}", "cannot go with server_from (the client names the server)"
                )
                return _MISSING
        return template, allow, resolve_timeout

    def health_check(self, section, path):
        health = self.settings(
            section,
            "health_check",
            HealthCheckSettings,
            {
                "interval": _positive_duration,
                "timeout": _positive_duration,
                "rise": _positive_int,
                "fall": _positive_int,
                "probe": _one_of(PROBES),
                "path": _http_path,
                "host": _host_name,
                "expect_status": _status_classes,
                "sni": _host_name,
                "send": _bytes_to_send,
                "expect": _safe_regex,
            },
            None,
        )
        if not isinstance(health, HealthCheckSettings):
            return health
        key = f"{path}.health_check"
        content_keys = [k for k in ("send", "expect") if getattr(health, k) not in (b"", None)]
        if health.probe == "content" and health.expect is None:
            self.reader.problem(
                f"{key}.expect", "probe content needs a regular expression the answer must contain"
            )
            return _MISSING
        if health.probe != "content" and content_keys:
            self.reader.problem(f"{key}.{content_keys[0]}", "is for probe: content only")
            return _MISSING
        return health

    def settings(self, parent, key, settings_class, converters, default):
        """A small mapping of known keys -> a settings object; absent keys keep defaults."""
        raw = parent.get(key, lambda v: v, _ABSENT)
        if raw is _ABSENT:
            return default
        section = self.reader.section(raw, parent.key_path(key))
        if section is None:
            return _MISSING
        problems_before = len(self.reader.problems)
        values = {name: section.get(name, convert, _ABSENT) for name, convert in converters.items()}
        section.finish()
        if len(self.reader.problems) > problems_before:
            return _MISSING
        return settings_class(**{k: v for k, v in values.items() if v is not _ABSENT})
