"""YAML configuration -> frozen, validated objects.

Every problem is collected with the exact key path (``listeners[0].routes[2].match.sni``) so a
user fixes a config in one go; nothing downstream ever reads the raw mapping.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping

import attrs
import yaml

from l4router.backends.probes import PROBES
from l4router.parsers.proxyprotocol import PP_FIELDS

try:  # the regular expression parser: re._parser on 3.11, sre_parse before
    from re import _constants as _regex_constants  # type: ignore[attr-defined]
    from re import _parser as _regex_parser  # type: ignore[attr-defined]
except ImportError:
    import sre_constants as _regex_constants
    import sre_parse as _regex_parser

from l4router.errors import ConfigError

REJECT = "reject"
BALANCE_POLICIES = ("round_robin", "random", "least_connections", "source_hash")
PROXY_PROTOCOL_VERSIONS = ("none", "v1", "v2")
PROXY_TLVS = ("authority", "alpn", "unique_id")  # what a v2 header out can carry
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
DEFAULT_DETECT_TIMEOUT = 3.0
DEFAULT_MAX_BYTES = 16384
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_UDP_IDLE_TIMEOUT = 30.0
TRANSPORTS = ("tcp", "udp")
RELAY_MODES = ("copy", "splice")
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# UDP sources are trivially spoofed: the session table is bounded unless a user says otherwise.
DEFAULT_MAX_SESSIONS = 4096
DEFAULT_MAX_SESSIONS_PER_SOURCE = 256
UNLIMITED = "unlimited"
DEFAULT_IPV6_SOURCE_PREFIX = 64  # one IPv6 host usually holds a whole /64
# What workers can share: their own SO_REUSEPORT sockets (tcp, udp), or the one socket
# systemd passed (every worker accepts from it).
SHAREABLE_ENDPOINT_TYPES = ("tcp", "tcp6", "udp", "systemd")
MAX_WORKERS = 256
# The host:port shorthand's accept queue; Twisted's default of 50 drops SYNs in bursts.
LISTEN_BACKLOG = 1024
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
FIELD_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class Regex(str):
    """A match pattern given as `{regex: ...}`: a regular expression, not a glob."""


@attrs.frozen
class GlobSet:
    """Case-insensitive patterns, globs or anchored regular expressions (`Regex`); matches
    when any pattern matches any value."""

    patterns: tuple
    regex: re.Pattern = attrs.field(eq=False, repr=False)

    @classmethod
    def of(cls, patterns):
        joined = "|".join(f"(?:{p}\\Z)" if isinstance(p, Regex) else f"(?:{fnmatch.translate(p)})"
                          for p in patterns)
        return cls(tuple(patterns), re.compile(joined, re.IGNORECASE | re.DOTALL))

    def matches(self, value):
        if isinstance(value, (tuple, list, frozenset, set)):
            return any(self.regex.match(str(v)) is not None for v in value)
        return self.regex.match(str(value)) is not None


@attrs.frozen
class RouteMatch:
    """Every given key must match; an empty match matches everything."""

    protocols: frozenset | None = None
    sources: tuple | None = None  # ip_network objects
    fields: tuple = ()  # (field name, GlobSet) pairs


@attrs.frozen
class Route:
    label: str  # the `name` given, else "routes[N]"; labels metrics and logs
    match: RouteMatch
    backend: str | None  # None: reject
    fallback: str | None = None  # the backend used while `backend` has no server up
    max_connections: int | None = None  # concurrent connections this route admits


@attrs.frozen
class DetectSettings:
    protocols: tuple | None  # None: every installed detector for the transport
    timeout: float
    max_bytes: int


@attrs.frozen
class RateLimit:
    """A token bucket: `rate` new connections a second on average, `burst` at once."""

    rate: float
    burst: int


@attrs.frozen
class Listener:
    name: str
    transport: str
    listen: tuple  # Twisted endpoint description strings
    detect: DetectSettings
    max_connections: int | None
    max_connections_per_source: int | None
    idle_timeout: float
    routes: tuple
    on_timeout: str | None  # backend name; None: reject
    default: str | None  # backend name; None: reject
    # The peers whose PROXY header is believed (ip_network objects); empty: none is expected.
    accept_proxy_protocol: tuple = ()
    relay: str = "splice"  # splice (zero-copy after the replay where os.splice exists) | copy
    ipv6_source_prefix: int = DEFAULT_IPV6_SOURCE_PREFIX  # per-source limits count IPv6 by prefix
    rate_per_source: RateLimit | None = None  # new connections (sessions) a source may open
    max_connections_per_name: int | None = None  # concurrent per detected SNI/Host/:authority


@attrs.frozen
class Server:
    host: str
    port: int
    weight: int = 1
    backup: bool = False  # gets clients only while no primary server of its backend is up

    @property
    def label(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class RetrySettings:
    """Connect attempts per client, across servers, with exponential backoff and jitter."""

    attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each backoff is scaled by a random factor in [1 - jitter, 1 + jitter]

    def backoff(self, retry_number):
        """The nominal wait before retry number `retry_number` (1 for the first retry)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))


@attrs.frozen
class HealthCheckSettings:
    interval: float = 5.0
    timeout: float = 1.0  # for the connect, and again for the answer of a probe
    rise: int = 2
    fall: int = 3
    probe: str = "tcp"  # what the check says and expects (l4router.backends.probes)
    path: str = "/"  # http: the request's path
    host: str | None = None  # http: the Host header (default: the server's host)
    expect_status: tuple = ("2xx", "3xx")  # http: status classes ("2xx") or codes ("204")
    sni: str | None = None  # tls: the name in the ClientHello (default: the server's host)
    send: bytes = b""  # content: sent once connected
    expect: str | None = None  # content: a regular expression the answer must contain


@attrs.frozen
class PoolSettings:
    min_idle: int = 0
    max_idle: int = 8
    idle_timeout: float = 60.0
    max_lifetime: float = 1800.0


@attrs.frozen
class Backend:
    name: str
    servers: tuple
    balance: str = "round_robin"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    retry: RetrySettings = RetrySettings()
    health_check: HealthCheckSettings | None = None  # None: no active or passive checks
    pool: PoolSettings = PoolSettings()
    max_connections_per_server: int | None = None
    max_connections: int | None = None  # concurrent connections to all its servers together
    proxy_protocol: str = "none"
    proxy_tlvs: tuple = ()  # PROXY v2 TLVs sent: authority, alpn, unique_id
    discovery: Discovery | None = None  # servers from DNS SRV or a watched file, not `servers`
    server_from: ServerFrom | None = None  # the server the client names, within `allow`
    allow: GlobSet | None = None  # the names server_from may take
    resolve_timeout: float = 1.0  # server_from: how long a name may take to resolve
    transparent: bool = False  # connect from the client's own address (IP_TRANSPARENT)


@attrs.frozen
class Discovery:
    """Where a backend's servers come from while it runs (l4router.backends.discovery)."""

    kind: str  # "srv" (DNS SRV records) or "file" (a JSON or YAML list, re-read on change)
    source: str  # the SRV name, or the file's absolute path
    refresh: float = 2.0  # file: how often it is looked at; srv: the shortest re-resolution


@attrs.frozen
class ServerFrom:
    """`server_from: "{sni}:443"` or `"{tenant}.internal:443"`: a host name made of detected
    fields (sni, host, authority) and named groups of the route's regular expressions."""

    host: str  # a str.format template
    port: int
    names: tuple  # the placeholders in `host`

    @property
    def captures(self):
        """Placeholders that are not detected fields: the route's named groups."""
        return tuple(n for n in self.names if n not in SERVER_FROM_FIELDS)

    def __str__(self):
        return f"{self.host}:{self.port}"


SERVER_FROM_FIELDS = ("sni", "host", "authority")


@attrs.frozen
class DnsSettings:
    """The DNS servers SRV discovery asks (none: /etc/resolv.conf's)."""

    servers: tuple = ()  # (host, port) pairs
    timeout: float = 2.0


@attrs.frozen
class AdminSettings:
    listen: tuple  # endpoint description strings; empty: no admin site
    token: str | None = None  # POST /reload needs "Authorization: Bearer <token>" (or a unix: site)
    hosts: tuple = ()  # Host names the site answers to besides IP literals and localhost


@attrs.frozen
class LoggingSettings:
    format: str = "text"
    access_log: bool = True
    level: str = "info"


@attrs.frozen
class Config:
    listeners: tuple
    backends: Mapping  # name -> Backend (a read-only mapping)
    max_connections: int | None
    shutdown_timeout: float
    admin: AdminSettings
    logging: LoggingSettings
    workers: int = 1  # processes: 1 runs in this process, more run under a supervisor
    state_file: str | None = None  # where runtime changes to servers outlive a restart
    upgrade_socket: str | None = None  # where a new process takes the listening sockets over
    dns: DnsSettings = DnsSettings()
    source: str = ""  # the file it came from, for logs
    digest: str = ""  # sha256 of the file (the admin token redacted), to tell configs apart
    text: bytes = attrs.field(default=b"", repr=False, eq=False)  # what was validated
    warnings: tuple = attrs.field(default=(), eq=False)  # valid, but surely not meant


class _FrozenDict(Mapping):
    """A read-only mapping, so a Config cannot be changed after validation."""

    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"{type(self).__name__}({self._items!r})"


class _Invalid(ValueError):
    """A value is wrong; the reader adds the key path."""


_MISSING = object()  # a required key is absent, or a value was invalid (already reported)
_ABSENT = object()  # an optional key is absent


class _Reader:
    """Walks the raw YAML, collecting (path, reason) problems instead of stopping at the first."""

    def __init__(self):
        self.problems = []

    def problem(self, path, reason):
        self.problems.append((path, reason))

    def section(self, raw, path):
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.problem(path, f"must be a mapping, not {_kind(raw)}")
            return None
        return _Section(self, raw, path)

    def convert(self, value, path, converter):
        try:
            return converter(value)
        except _Invalid as exc:
            self.problem(path, str(exc))
            return _MISSING


class _Section:
    def __init__(self, reader, raw, path):
        self.reader = reader
        self.raw = raw
        self.path = path
        self.used = set()

    def key_path(self, key):
        return f"{self.path}.{key}" if self.path else key

    def has(self, key):
        return key in self.raw

    def get(self, key, converter, default=_MISSING):
        """The converted value, `default` when absent, or _MISSING after a recorded problem."""
        self.used.add(key)
        if key not in self.raw:
            if default is _MISSING:
                self.reader.problem(self.key_path(key), "is required")
            return default
        return self.reader.convert(self.raw[key], self.key_path(key), converter)

    def finish(self):
        for key in self.raw:
            if key not in self.used:
                self.reader.problem(self.key_path(str(key)), "unknown key")


def _kind(value):
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "empty"}.get(type(value), type(value).__name__)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value):
    """`150ms`, `5s`, `2m`, `1h` or plain seconds -> float seconds."""
    if isinstance(value, bool):
        raise _Invalid(f"must be a duration such as 150ms, 5s, 2m, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if match is None:
            raise _Invalid(f"must be a duration such as 150ms, 5s, 2m or 1h, not {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise _Invalid(f"must not be negative, not {value!r}")
    return seconds


def _positive_duration(value):
    seconds = parse_duration(value)
    if seconds <= 0:
        raise _Invalid(f"must be greater than zero, not {value!r}")
    return seconds


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"must be a whole number of at least 1, not {value!r}")
    return value


def _non_negative_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(f"must be a whole number of at least 0, not {value!r}")
    return value


def _number(low, high):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not low <= value <= high:
            raise _Invalid(f"must be a number from {low} to {high}, not {value!r}")
        return float(value)

    return convert


def _token(value):
    if not isinstance(value, str) or len(value) < 16 or not value.isprintable():
        raise _Invalid("must be a printable string of at least 16 characters")
    return value


def _limit(value):
    """A count of at least 1, or `unlimited` (None)."""
    if value == UNLIMITED:
        return None
    try:
        return _positive_int(value)
    except _Invalid:
        raise _Invalid(f"must be a whole number of at least 1 or {UNLIMITED!r}, "
                       f"not {value!r}") from None


def _rate_limit(value):
    """`{rate: 10, burst: 20}`: new connections a second per source, and how many at once."""
    if not isinstance(value, Mapping) or not set(value) <= {"rate", "burst"} or \
            "rate" not in value:
        raise _Invalid(f"must be {{rate: N, burst: N}} (new connections a second, and at "
                       f"once), not {value!r}")
    rate = _number(0.001, 1e6)(value["rate"])
    burst = _positive_int(value.get("burst", max(1, int(rate))))
    return RateLimit(float(rate), burst)


def _number_in(low, high):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"must be a whole number from {low} to {high}, not {value!r}")
        return value

    return convert


def _trusted_senders(value):
    """`{from: [CIDR, ...]}`: whose PROXY header is believed. A bare `true` would believe
    anyone, and anyone could then claim any source address."""
    if value is False:
        return ()
    if not isinstance(value, Mapping) or set(value) != {"from"}:
        raise _Invalid("must name the senders whose header is trusted, e.g. "
                       "{from: [10.0.0.0/8]} (a header from anyone else closes the "
                       f"connection), or false; not {value!r}")
    return _networks(value["from"])


def _boolean(value):
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, not {value!r}")
    return value


def _one_of(choices):
    def convert(value):
        if value not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    return convert


def _name(value):
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _Invalid(f"must be a name of letters, digits, '_', '.', '-' (at most 64), "
                       f"not {value!r}")
    return value


_HOST_PORT_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-_*]*)):(?P<port>\d+)$")
_ENDPOINT_TYPES_WITHOUT_PROBE = ("systemd",)  # need the process environment to construct


def split_host_port(value):
    """`host:port` or `[v6]:port` -> (host, port); host may be empty."""
    match = _HOST_PORT_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _Invalid(f"must be host:port or [ipv6]:port, not {value!r}")
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise _Invalid(f"port must be 1-65535, not {port}")
    host = match.group("v6") if match.group("v6") is not None else match.group("host")
    if match.group("v6") is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{host!r} is not an IPv6 address") from None
    return host, port


def _endpoint_type(value):
    return value.split(":", 1)[0]


def listen_description(value, default_host=""):
    """A Twisted server endpoint string, or the `host:port` / `[v6]:port` shorthand ->
    endpoint string."""
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be an endpoint string or host:port, not {value!r}")
    match = _HOST_PORT_RE.match(value)
    if match is None or match.group("host") in _known_endpoint_types():
        description = value
    else:
        host, port = split_host_port(value)
        host = default_host if host in ("", "*") else host
        if ":" in host:
            description = f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
        else:
            description = f"tcp:{port}" + (f":interface={host}" if host else "")
        description += f":backlog={LISTEN_BACKLOG}"
    if _endpoint_type(description) not in _ENDPOINT_TYPES_WITHOUT_PROBE:
        from twisted.internet.endpoints import serverFromString

        try:
            # Construction binds nothing; it checks the syntax and the parameters.
            serverFromString(None, description)
        except (ValueError, KeyError, TypeError) as exc:
            raise _Invalid(f"bad endpoint {description!r}: {exc}") from None
    return description


@functools.cache
def _known_endpoint_types():
    from twisted.internet.endpoints import _serverParsers
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    names = set(_serverParsers)
    names.update(p.prefix for p in getPlugins(IStreamServerEndpointStringParser))
    return names


def usable_cores():
    """The cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers(value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise _Invalid(f"must be auto or a number of processes from 1 to {MAX_WORKERS}, "
                       f"not {value!r}")
    return value


def _string_list(value):
    values = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not values:
        raise _Invalid(f"must be a string or a non-empty list of strings, not {value!r}")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (str, int)) or item == "":
            raise _Invalid(f"must hold non-empty strings, not {item!r}")
    return tuple(str(v) for v in values)


def _proxy_protocol_out(value):
    """`none` | `v1` | `v2`, or `{version: v2, tlvs: [authority, alpn, unique_id]}` ->
    (version, TLV names)."""
    if not isinstance(value, Mapping):
        return _one_of(PROXY_PROTOCOL_VERSIONS)(value), ()
    unknown = set(value) - {"version", "tlvs"}
    if unknown:
        raise _Invalid(f"unknown key {sorted(map(str, unknown))[0]!r} (known: version, tlvs)")
    if value.get("version") != "v2":
        raise _Invalid("TLVs need version: v2")
    tlvs = _string_list(value["tlvs"]) if "tlvs" in value else ()
    for tlv in tlvs:
        if tlv not in PROXY_TLVS:
            raise _Invalid(f"no TLV is called {tlv!r} (known: {', '.join(PROXY_TLVS)})")
    return "v2", tlvs


MAX_REGEX = 512


def _patterns(value):
    """A match field's patterns: globs, `{regex: ...}` (anchored: it must match the whole
    value), or `true`/`false` for a yes-or-no field (`truncated: true`)."""
    if isinstance(value, bool):
        return ("true" if value else "false",)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _Invalid("must be a pattern or a non-empty list of them")
    patterns = []
    for item in items:
        if isinstance(item, Mapping):
            if set(item) != {"regex"} or not isinstance(item["regex"], str):
                raise _Invalid(f"a regular expression is {{regex: '...'}}, not {item!r}")
            patterns.append(Regex(_safe_regex(item["regex"])))
        else:
            patterns.extend(_string_list([item]))
    return tuple(patterns)


def _safe_regex(expression):
    """A regular expression fit to run on client bytes: it compiles, it is not too long, and
    no repetition holds another repetition or alternatives (`(a+)+`, `(a|aa)*`): the shapes
    whose backtracking takes exponential time on a value that almost matches. (A character
    class, `[ab]+`, is fine.)"""
    if len(expression) > MAX_REGEX:
        raise _Invalid(f"a regular expression of at most {MAX_REGEX} characters")
    try:
        re.compile(expression)
        parsed = _regex_parser.parse(expression)
    except (re.error, RecursionError) as exc:
        raise _Invalid(f"not a regular expression: {exc}") from None
    if _nested_repeat(parsed, inside=False):
        raise _Invalid(f"{expression!r} repeats a repetition or alternatives, which can take "
                       "exponential time on a value that almost matches")
    return expression


_REPEATS = {_regex_constants.MAX_REPEAT, _regex_constants.MIN_REPEAT,
            getattr(_regex_constants, "POSSESSIVE_REPEAT", None)} - {None}


def _nested_repeat(parsed, inside):
    for op, arg in parsed:
        if op in _REPEATS:
            low, high, sub = arg
            if inside or _nested_repeat(sub, inside=high > 1):
                if high > 1:
                    return True
        elif op == _regex_constants.SUBPATTERN:
            if _nested_repeat(arg[-1], inside):
                return True
        elif op == _regex_constants.BRANCH:
            if inside or any(_nested_repeat(branch, inside) for branch in arg[1]):
                return True
    return False


def _networks(value):
    networks = []
    for item in _string_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _Invalid(f"{item!r} is not an IP address or CIDR such as 192.0.2.0/24") from None
    return tuple(networks)


def _host_names(value):
    return tuple(name.lower().rstrip(".") for name in _string_list(value))


def _http_path(value):
    if not isinstance(value, str) or not re.fullmatch(r"/[\x21-\x7e]*", value):
        raise _Invalid(f"must be a path starting with / (no spaces), not {value!r}")
    return value


def _host_name(value):
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,253}", value):
        raise _Invalid(f"must be a host name, not {value!r}")
    return value


def _status_classes(value):
    items = value if isinstance(value, list) else [value]
    classes = tuple(str(item).lower() for item in items)
    if not classes or not all(re.fullmatch(r"[1-5](xx|\d\d)", c) for c in classes):
        raise _Invalid(f"must be status classes such as 2xx or codes such as 204, not {value!r}")
    return classes


def _bytes_to_send(value):
    if not isinstance(value, str) or len(value) > 4096:
        raise _Invalid("must be a string of at most 4096 characters (YAML escapes: \"\\r\\n\")")
    return value.encode("utf-8")


def _server_from(value):
    match = re.fullmatch(r"((?:\{[a-z_][a-z0-9_]*\}|[a-z0-9.-])+):(\d{1,5})",
                         value) if isinstance(value, str) else None
    names = tuple(re.findall(r"\{([a-z_][a-z0-9_]*)\}", match.group(1))) if match else ()
    if match is None or not names or not 0 < int(match.group(2)) < 65536:
        raise _Invalid(f"must be \"HOST:PORT\" where HOST has {{FIELD}} placeholders ("
                       f"{', '.join(SERVER_FROM_FIELDS)}, or a named group of the route's "
                       f"regex), such as \"{{sni}}:443\" or \"{{tenant}}.internal:443\", "
                       f"not {value!r}")
    return ServerFrom(match.group(1), int(match.group(2)), names)


def _discovery(value):
    kinds = [k for k in ("srv", "file") if k in value]
    unknown = set(value) - {"srv", "file", "refresh"}
    if unknown or len(kinds) != 1:
        raise _Invalid("must be a list of servers, {srv: _service._tcp.NAME} or {file: PATH} "
                       "(with an optional refresh)")
    kind = kinds[0]
    source = value[kind]
    if kind == "srv" and not (isinstance(source, str) and
                              re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", source)):
        raise _Invalid(f"srv must be a DNS name such as _http._tcp.example.com, not {source!r}")
    if kind == "file":
        if not isinstance(source, str) or not os.path.isabs(source):
            raise _Invalid(f"file must be an absolute path, not {source!r}")
        if not os.path.isdir(os.path.dirname(source)):
            raise _Invalid(f"the directory of {source!r} does not exist")
    refresh = _positive_duration(value.get("refresh", 2.0))
    return Discovery(kind, source, refresh)


def _dns_servers(value):
    servers = []
    for item in _string_list(value):
        host, port = split_host_port(item if ":" in item else f"{item}:53")
        servers.append((host, port))
    if not servers:
        raise _Invalid("must list at least one DNS server, host:port")
    return tuple(servers)


def _file_path(value):
    """An absolute path in a directory that exists (the file itself is made later)."""
    if not isinstance(value, str) or not os.path.isabs(value):
        raise _Invalid(f"must be an absolute file path, not {value!r}")
    if not os.path.isdir(os.path.dirname(value)):
        raise _Invalid(f"the directory of {value!r} does not exist")
    return value


def parse_server(value):
    """`host:port` or `{address: host:port, weight: N, backup: BOOL}` -> Server; raises
    ValueError (a config's `servers`, a discovery file's entries, a runtime `add`)."""
    if isinstance(value, str):
        host, port = split_host_port(value)
        weight = 1
    elif isinstance(value, Mapping):
        unknown = set(value) - {"address", "weight", "backup"}
        if unknown:
            raise _Invalid(f"unknown key {sorted(map(str, unknown))[0]!r} "
                           "(known: address, weight, backup)")
        if "address" not in value:
            raise _Invalid("needs an address: host:port")
        host, port = split_host_port(value["address"])
        weight = _positive_int(value.get("weight", 1))
        backup = _boolean(value.get("backup", False))
    else:
        raise _Invalid(f"must be host:port or {{address: host:port, weight: N, backup: BOOL}}, "
                       f"not {value!r}")
    if not host:
        raise _Invalid(f"needs a host: {value!r}")
    return Server(host, port, weight, backup if isinstance(value, Mapping) else False)


class _Builder:
    """Turns the raw mapping into a Config, knowing which detectors are installed."""

    def __init__(self, reader, detectors):
        self.reader = reader
        self.warnings = []  # what is valid but surely not meant (a route never reached)
        self.detectors = {d.name: d for d in detectors}
        declared = [getattr(d, "fields", None) for d in detectors]
        # A plugin that does not declare its fields may produce any; then field names go unchecked.
        self.known_fields = None
        if declared and all(f is not None for f in declared):
            self.known_fields = set().union(*declared)

    def build(self, raw):
        top = self.reader.section(raw, "")
        if top is None:
            return None
        backends = self.backends(top)
        listeners = self.listeners(top, backends)
        limits = top.get("limits", lambda v: v, {})
        limits_section = self.reader.section(limits, "limits")
        max_connections = None
        if limits_section is not None:
            max_connections = limits_section.get("max_connections", _positive_int, None)
            limits_section.finish()
        shutdown_timeout = top.get("shutdown_timeout", parse_duration, DEFAULT_SHUTDOWN_TIMEOUT)
        admin = self.admin(top)
        logging = self.logging(top)
        workers = self.workers(top, listeners)
        state_file = top.get("state_file", _file_path, None)
        upgrade_socket = top.get("upgrade_socket", _file_path, None)
        dns = self.settings(top, "dns", DnsSettings, {
            "servers": _dns_servers, "timeout": _positive_duration}, DnsSettings())
        top.finish()
        return Config(
            listeners=listeners, backends=_FrozenDict(backends), max_connections=max_connections,
            shutdown_timeout=shutdown_timeout, admin=admin, logging=logging, workers=workers,
            state_file=state_file, dns=DnsSettings() if dns is _MISSING else dns,
            upgrade_socket=upgrade_socket,
        )

    def workers(self, top, listeners):
        """`auto` is a worker per usable core, or 1 when a listener's socket cannot be shared
        by workers (unix:); an explicit N > 1 then is an error."""
        workers = top.get("workers", _workers, "auto")
        unshareable = [(listener.name, description) for listener in listeners
                       for description in listener.listen
                       if _endpoint_type(description) not in SHAREABLE_ENDPOINT_TYPES]
        if workers == "auto":
            return 1 if unshareable else usable_cores()
        if workers is not _MISSING and workers > 1 and unshareable:
            name, description = unshareable[0]
            self.reader.problem("workers", f"{workers} workers each need their own socket, which "
                                           f"listener {name!r} cannot have on {description!r} "
                                           "(only tcp, tcp6, udp and systemd addresses): set "
                                           "workers: 1")
        return 1 if workers is _MISSING else workers

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
                self.reader.problem(section.key_path("servers"), "must be a non-empty list of "
                                    "host:port, {srv: NAME} or {file: PATH}")
            else:
                for index, server in enumerate(servers):
                    parsed.append(self.reader.convert(server, f"{path}.servers[{index}]",
                                                      parse_server))
        balance = section.get("balance", _one_of(BALANCE_POLICIES), "round_robin")
        connect_timeout = section.get("connect_timeout", _positive_duration,
                                      DEFAULT_CONNECT_TIMEOUT)
        retry = self.settings(section, "retry", RetrySettings, {
            "attempts": _positive_int, "initial_backoff": parse_duration,
            "max_backoff": parse_duration, "multiplier": _number(1.0, 100.0),
            "jitter": _number(0.0, 1.0)}, RetrySettings())
        health = self.health_check(section, path)
        pool = self.settings(section, "pool", PoolSettings, {
            "min_idle": _non_negative_int, "max_idle": _non_negative_int,
            "idle_timeout": _positive_duration, "max_lifetime": _positive_duration}, PoolSettings())
        if isinstance(pool, PoolSettings) and pool.max_idle < pool.min_idle:
            self.reader.problem(f"{path}.pool.max_idle",
                                f"must be at least min_idle ({pool.min_idle})")
            pool = _MISSING
        per_server = section.get("max_connections_per_server", _positive_int, None)
        maximum = section.get("max_connections", _positive_int, None)
        transparent = section.get("transparent", _boolean, False)
        if transparent is True and isinstance(pool, PoolSettings) and pool.min_idle:
            self.reader.problem(f"{path}.transparent", "cannot go with pool.min_idle: a spare "
                                "connection is made before there is a client to send it from")
            transparent = _MISSING
        proxy_protocol = section.get("proxy_protocol", _proxy_protocol_out, ("none", ()))
        section.finish()
        values = (balance, connect_timeout, retry, health, pool, per_server, proxy_protocol,
                  discovery, named, maximum, transparent)
        if _MISSING in parsed or not (parsed or discovery or named) or _MISSING in values:
            return None
        version, tlvs = proxy_protocol
        server_from, allow, resolve_timeout = named or (None, None, 1.0)
        return Backend(name, tuple(parsed), balance, connect_timeout, retry, health, pool,
                       max_connections_per_server=per_server, max_connections=maximum,
                       proxy_protocol=version, proxy_tlvs=tlvs, discovery=discovery,
                       server_from=server_from, allow=allow, resolve_timeout=resolve_timeout,
                       transparent=transparent)

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
            self.reader.problem(f"{path}.allow", "server_from needs the names it may take "
                                "(a list of patterns): without it the router is an open relay")
            return _MISSING
        for key in ("servers", "health_check", "pool"):
            if key in servers:
                self.reader.problem(f"{path}.{key}", "cannot go with server_from (the client "
                                                     "names the server)")
                return _MISSING
        return template, allow, resolve_timeout

    def health_check(self, section, path):
        health = self.settings(section, "health_check", HealthCheckSettings, {
            "interval": _positive_duration, "timeout": _positive_duration,
            "rise": _positive_int, "fall": _positive_int, "probe": _one_of(PROBES),
            "path": _http_path, "host": _host_name, "expect_status": _status_classes,
            "sni": _host_name, "send": _bytes_to_send, "expect": _safe_regex}, None)
        if not isinstance(health, HealthCheckSettings):
            return health
        key = f"{path}.health_check"
        content_keys = [k for k in ("send", "expect") if getattr(health, k) not in (b"", None)]
        if health.probe == "content" and health.expect is None:
            self.reader.problem(f"{key}.expect", "probe content needs a regular expression "
                                                 "the answer must contain")
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
                self.reader.problem(f"{path}.name", f"duplicate listener name {listener.name!r} "
                                                    f"(also listeners[{seen[listener.name]}])")
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
        for other in ({"connections", "sessions"} - {unit}):
            for key in (f"max_{other}", f"max_{other}_per_source"):
                if section.has(key):
                    section.used.add(key)
                    self.reader.problem(section.key_path(key),
                                        f"is for {'udp' if other == 'sessions' else 'tcp'} "
                                        f"listeners; this one is {self.transport}")
        max_connections = section.get(f"max_{unit}", _limit,
                                      DEFAULT_MAX_SESSIONS if udp else None)
        per_source = section.get(f"max_{unit}_per_source", _limit,
                                 DEFAULT_MAX_SESSIONS_PER_SOURCE if udp else None)
        ipv6_prefix = section.get("ipv6_source_prefix", _number_in(1, 128),
                                  DEFAULT_IPV6_SOURCE_PREFIX)
        rate = section.get("rate_per_source", _rate_limit, None)
        idle_timeout = section.get("idle_timeout", _positive_duration,
                                   DEFAULT_UDP_IDLE_TIMEOUT if udp else DEFAULT_IDLE_TIMEOUT)
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
                    self.reader.problem(section.key_path(f"routes[{index}].max_connections"),
                                        "is for tcp listeners (UDP sessions: max_sessions)")
        target = self.target(backends)
        default = section.get("default", target, None)
        on_timeout = section.get("on_timeout", target, default)
        section.finish()
        values = (name, transport, listen, detect, max_connections, per_source, idle_timeout,
                  routes, default, on_timeout, accept_proxy, relay, ipv6_prefix, rate, per_name)
        if _MISSING in values:
            return None
        return Listener(name=name, transport=transport, listen=listen, detect=detect,
                        max_connections=max_connections, max_connections_per_source=per_source,
                        idle_timeout=idle_timeout, routes=routes, on_timeout=on_timeout,
                        default=default, accept_proxy_protocol=accept_proxy, relay=relay,
                        ipv6_source_prefix=ipv6_prefix, rate_per_source=rate,
                        max_connections_per_name=per_name)

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
                raise _Invalid(f"no installed {transport} detector is called {name!r} "
                               f"(installed: {', '.join(sorted(allowed))})")
        return names

    def target(self, backends):
        def convert(value):
            if value is None or value == REJECT:
                return None
            if not isinstance(value, str):
                raise _Invalid(f"must be a backend name or {REJECT!r}, not {value!r}")
            if value not in backends:
                raise _Invalid(f"no backend is called {value!r} "
                               f"(defined: {', '.join(sorted(backends)) or 'none'})")
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
                    "before it matches every connection it would")
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
            self.reader.problem(f"{path}.fallback", "names another backend, for a route to a "
                                                   "backend")
            return None
        if _MISSING in (label, match, fallback, maximum) or (section.has("backend") and
                                                             backend is _MISSING):
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
                self.reader.problem(field_path,
                                    "a field name is lower-case letters, digits and '_'")
                continue
            if key in PP_FIELDS:
                if not proxied:
                    self.reader.problem(field_path, f"{key} comes from a PROXY v2 header: the "
                                        "listener needs accept_proxy_protocol")
                    continue
            elif self.known_fields is not None and key not in self.known_fields:
                self.reader.problem(field_path, f"no installed detector produces field {key!r} "
                                                f"(known: {', '.join(sorted(self.known_fields))})")
                continue
            never = key not in PP_FIELDS and self.never_produced(protocols, key)
            if never:
                self.reader.problem(field_path, f"protocol {never} never produces field {key!r}: "
                                                "this route could never match")
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
        declared = [getattr(d, "fields", None) if d is not None else () for d in producers]
        if any(fields is None or field in fields for fields in declared):
            return ""
        return " or ".join(sorted(protocols))

    def admin(self, top):
        raw = top.get("admin", lambda v: v, {})
        section = self.reader.section(raw, "admin")
        if section is None:
            return AdminSettings(())
        listen = section.get("listen", self.admin_listen, ())
        token = section.get("token", _token, None)
        hosts = section.get("hosts", _host_names, ())
        section.finish()
        return AdminSettings(() if listen is _MISSING else listen,
                             None if token is _MISSING else token,
                             () if hosts is _MISSING else hosts)

    @staticmethod
    def admin_listen(value):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list):
            raise _Invalid(f"must be an endpoint string or a list of them, not {value!r}")
        # The admin site defaults to loopback: a bare ":9100" does not expose it.
        return tuple(listen_description(v, default_host="127.0.0.1") for v in values)

    def logging(self, top):
        raw = top.get("logging", lambda v: v, {})
        section = self.reader.section(raw, "logging")
        if section is None:
            return LoggingSettings()
        fmt = section.get("format", _one_of(LOG_FORMATS), "text")
        access_log = section.get("access_log", _boolean, True)
        level = section.get("level", _one_of(LOG_LEVELS), "info")
        section.finish()
        if _MISSING in (fmt, access_log, level):
            return LoggingSettings()
        return LoggingSettings(fmt, access_log, level)


def shadows(first, later):
    """`first` matches every connection `later` matches, so a route with `later` after one
    with `first` is never reached: every key of `first` is in `later`, no wider."""
    if first.protocols is not None and (later.protocols is None or
                                        not later.protocols <= first.protocols):
        return False
    if first.sources is not None and (later.sources is None or not all(
            any(net.version == wide.version and net.subnet_of(wide) for wide in first.sources)
            for net in later.sources)):
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


def parse_config(text, detectors, source="<string>"):
    """Parse YAML text into a Config, or raise ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([(f"{source}: {where}", f"not valid YAML: {reason}")]) from None
    reader = _Reader()
    builder = _Builder(reader, list(detectors))
    config = builder.build(raw)
    if reader.problems:
        raise ConfigError(reader.problems)
    config = attrs.evolve(config, warnings=tuple(builder.warnings))
    text = text.encode() if isinstance(text, str) else text
    return attrs.evolve(config, source=source, digest=config_digest(text, config.admin.token),
                        text=text)


def config_digest(text, token):
    """sha256 of the file with the admin token redacted: the digest is published (metrics,
    status page) and must not let anyone test guesses of the token."""
    if token:
        text = text.replace(token.encode(), b"<redacted>")
    return hashlib.sha256(text).hexdigest()


def load_config(path, detectors):
    """Read and parse a config file; an unreadable file is a ConfigError too."""
    try:
        with open(path, "rb") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read: {exc.strerror}")]) from None
    return parse_config(text, detectors, source=str(path))
