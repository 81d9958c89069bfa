"""YAML configuration -> frozen, validated objects.

Every problem is collected with the exact key path (``listeners[0].routes[2].match.sni``) so a
user fixes a config in one go; nothing downstream ever reads the raw mapping.

`model` holds the frozen objects, `reader` the key-path bookkeeping, `values` and `endpoints`
the converters of single values, `listener_parts` and `backend_parts` the sections, and
`builder` the whole and the entry points (`parse_config`, `load_config`).
"""

from l4router.config.builder import config_digest, load_config, parse_config
from l4router.config.endpoints import listen_description, split_host_port, usable_cores
from l4router.config.model import (
    Backend,
    Config,
    DetectSettings,
    Discovery,
    DnsSettings,
    GlobSet,
    HealthCheckSettings,
    Listener,
    PoolSettings,
    RateLimit,
    Regex,
    RetrySettings,
    Route,
    RouteMatch,
    Server,
    ServerFrom,
)
from l4router.config.values import parse_duration, parse_server

__all__ = [
    "Backend",
    "Config",
    "DetectSettings",
    "Discovery",
    "DnsSettings",
    "GlobSet",
    "HealthCheckSettings",
    "Listener",
    "PoolSettings",
    "RateLimit",
    "Regex",
    "RetrySettings",
    "Route",
    "RouteMatch",
    "Server",
    "ServerFrom",
    "config_digest",
    "listen_description",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_server",
    "split_host_port",
    "usable_cores",
]
