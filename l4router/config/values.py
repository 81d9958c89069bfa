"""Converters of single values (durations, limits, patterns, servers, ...): each returns
the value or raises _Invalid with the reason; the reader adds the key path."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

try:  # the regular expression parser: re._parser on 3.11, sre_parse before
    from re import _constants as _regex_constants  # type: ignore[attr-defined]
    from re import _parser as _regex_parser  # type: ignore[attr-defined]
except ImportError:
    import sre_constants as _regex_constants
    import sre_parse as _regex_parser


from l4router.config.endpoints import split_host_port
from l4router.config.model import (
    NAME_RE,
    PROXY_PROTOCOL_VERSIONS,
    PROXY_TLVS,
    SERVER_FROM_FIELDS,
    UNLIMITED,
    Discovery,
    QuicLb,
    RateLimit,
    Regex,
    Server,
    ServerFrom,
)
from l4router.config.reader import _Invalid

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
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not low <= value <= high
        ):
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
        raise _Invalid(
            f"must be a whole number of at least 1 or {UNLIMITED!r}, not {value!r}"
        ) from None


def _rate_limit(value):
    """`{rate: 10, burst: 20}`: new connections a second per source, and how many at once."""
    if not isinstance(value, Mapping) or not set(value) <= {"rate", "burst"} or "rate" not in value:
        raise _Invalid(
            f"must be {{rate: N, burst: N}} (new connections a second, and at once), not {value!r}"
        )
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
        raise _Invalid(
            "must name the senders whose header is trusted, e.g. "
            "{from: [10.0.0.0/8]} (a header from anyone else closes the "
            f"connection), or false; not {value!r}"
        )
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
        raise _Invalid(
            f"must be a name of letters, digits, '_', '.', '-' (at most 64), not {value!r}"
        )
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
        raise _Invalid(
            f"{expression!r} repeats a repetition or alternatives, which can take "
            "exponential time on a value that almost matches"
        )
    return expression


_REPEATS = {
    _regex_constants.MAX_REPEAT,
    _regex_constants.MIN_REPEAT,
    getattr(_regex_constants, "POSSESSIVE_REPEAT", None),
} - {None}


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
        raise _Invalid('must be a string of at most 4096 characters (YAML escapes: "\\r\\n")')
    return value.encode("utf-8")


def _server_from(value):
    match = (
        re.fullmatch(r"((?:\{[a-z_][a-z0-9_]*\}|[a-z0-9.-])+):(\d{1,5})", value)
        if isinstance(value, str)
        else None
    )
    names = tuple(re.findall(r"\{([a-z_][a-z0-9_]*)\}", match.group(1))) if match else ()
    if match is None or not names or not 0 < int(match.group(2)) < 65536:
        raise _Invalid(
            f'must be "HOST:PORT" where HOST has {{FIELD}} placeholders ('
            f"{', '.join(SERVER_FROM_FIELDS)}, or a named group of the route's "
            f'regex), such as "{{sni}}:443" or "{{tenant}}.internal:443", '
            f"not {value!r}"
        )
    return ServerFrom(match.group(1), int(match.group(2)), names)


def _discovery(value):
    kinds = [k for k in ("srv", "file") if k in value]
    unknown = set(value) - {"srv", "file", "refresh"}
    if unknown or len(kinds) != 1:
        raise _Invalid(
            "must be a list of servers, {srv: _service._tcp.NAME} or {file: PATH} "
            "(with an optional refresh)"
        )
    kind = kinds[0]
    source = value[kind]
    if kind == "srv" and not (
        isinstance(source, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", source)
    ):
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
        unknown = set(value) - {"address", "weight", "backup", "quic_lb_id"}
        if unknown:
            raise _Invalid(
                f"unknown key {sorted(map(str, unknown))[0]!r} "
                "(known: address, weight, backup, quic_lb_id)"
            )
        if "address" not in value:
            raise _Invalid("needs an address: host:port")
        host, port = split_host_port(value["address"])
        weight = _positive_int(value.get("weight", 1))
        backup = _boolean(value.get("backup", False))
        quic_lb_id = _hex_id(value["quic_lb_id"]) if "quic_lb_id" in value else None
    else:
        raise _Invalid(
            f"must be host:port or {{address: host:port, weight: N, backup: BOOL}}, not {value!r}"
        )
    if not host:
        raise _Invalid(f"needs a host: {value!r}")
    if not isinstance(value, Mapping):
        return Server(host, port, weight)
    return Server(host, port, weight, backup, quic_lb_id)


def _hex_id(value):
    try:
        octets = bytes.fromhex(str(value))
    except ValueError:
        octets = b""
    if not 1 <= len(octets) <= 15:
        raise _Invalid(f"quic_lb_id must be 1 to 15 octets in hex such as 0a01, not {value!r}")
    return octets


def _quic_lb(value):
    if not isinstance(value, Mapping) or set(value) - {"config_rotation", "server_id_length"}:
        raise _Invalid("must be {config_rotation: 0-6, server_id_length: 1-15}")
    rotation = _number_in(0, 6)(value.get("config_rotation", 0))
    length = _number_in(1, 15)(value.get("server_id_length", 1))
    return QuicLb(int(rotation), int(length))
