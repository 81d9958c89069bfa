"""The config as the rest of the router sees it: frozen objects, and the defaults they
start from."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

import attrs

from l4router.connection.addresses import host_port

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
        joined = "|".join(
            f"(?:{p}\\Z)" if isinstance(p, Regex) else f"(?:{fnmatch.translate(p)})"
            for p in patterns
        )
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
    quic_lb_id: bytes | None = None  # its server ID in QUIC-LB connection IDs

    @property
    def label(self):
        return host_port(self.host, self.port)


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
    quic_lb: QuicLb | None = None  # server IDs decoded from QUIC connection IDs


@attrs.frozen
class QuicLb:
    """QUIC-LB (draft-ietf-quic-load-balancers), plaintext: the servers put their server ID,
    `server_id_length` octets, right after the first octet of the connection IDs they issue,
    whose top three bits are `config_rotation`."""

    config_rotation: int = 0
    server_id_length: int = 1


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
