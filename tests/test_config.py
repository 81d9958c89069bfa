"""Config parsing: valid configs become frozen objects; every bad one names its key path."""

import attrs
import pytest

from l4router.config import load_config, parse_config, parse_duration
from l4router.detection.registry import installed_detectors
from l4router.errors import ConfigError

DETECTORS = installed_detectors()

GOOD = """
listeners:
  - name: edge
    listen: ["127.0.0.1:8443", "[::1]:8443", "tcp:9443:interface=127.0.0.1"]
    detect: {protocols: [tls, http1], timeout: 150ms, max_bytes: 4096}
    max_connections: 10
    max_connections_per_source: 2
    idle_timeout: 2m
    routes:
      - match: {protocol: tls, sni: ["*.example.com", "example.com"], alpn: h2}
        backend: web
      - name: api
        match: {protocol: http1, host: "*.example.com", path: "/api/*"}
        backend: web
      - match: {source: ["192.0.2.0/24", "2001:db8::/32"]}
        reject: true
    on_timeout: web
    default: reject
backends:
  web:
    servers: ["127.0.0.1:9443", {address: "[::1]:9444", weight: 2}]
    connect_timeout: 1.5
limits: {max_connections: 100}
shutdown_timeout: 1h
admin: {listen: ":9100"}
logging: {format: json, access_log: false}
"""


def parse(text):
    return parse_config(text, DETECTORS)


def test_good_config_is_fully_parsed():
    config = parse(GOOD)
    listener = config.listeners[0]
    assert listener.listen == (
        "tcp:8443:interface=127.0.0.1:backlog=1024",
        "tcp6:8443:interface=\\:\\:1:backlog=1024",
        "tcp:9443:interface=127.0.0.1",
    )
    assert listener.detect.timeout == 0.15 and listener.detect.max_bytes == 4096
    assert listener.detect.protocols == ("tls", "http1")
    assert listener.idle_timeout == 120.0
    assert [r.label for r in listener.routes] == ["routes[0]", "api", "routes[2]"]
    assert listener.routes[2].backend is None
    assert listener.default is None and listener.on_timeout == "web"
    sni = dict(listener.routes[0].match.fields)["sni"]
    assert sni.matches("WWW.Example.COM") and sni.matches("example.com")
    assert not sni.matches("example.com.evil.net")
    web = config.backends["web"]
    assert [(s.host, s.port, s.weight) for s in web.servers] == [
        ("127.0.0.1", 9443, 1),
        ("::1", 9444, 2),
    ]
    assert web.connect_timeout == 1.5
    assert config.max_connections == 100 and config.shutdown_timeout == 3600.0
    assert config.admin.listen == ("tcp:9100:interface=127.0.0.1:backlog=1024",)
    assert config.logging.format == "json" and config.logging.access_log is False
    assert len(config.digest) == 64


def test_config_is_frozen():
    config = parse(GOOD)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.listeners[0].name = "other"
    with pytest.raises(TypeError):
        config.backends["x"] = None


def test_on_timeout_defaults_to_default():
    config = parse(
        "listeners: [{name: a, listen: ':1', default: b}]\n"
        "backends: {b: {servers: ['127.0.0.1:2']}}"
    )
    assert config.listeners[0].on_timeout == "b"


@pytest.mark.parametrize(
    "value, seconds",
    [("150ms", 0.15), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), (3, 3.0), ("0.5", 0.5)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


BASE_LISTENER = "{name: a, listen: '127.0.0.1:1', default: b}"
BASE_BACKENDS = "backends: {b: {servers: ['127.0.0.1:2']}}"

BAD = [
    ("listeners: [", "line 1, column 13", "not valid YAML"),
    (f"listeners: [{BASE_LISTENER}]\n{BASE_BACKENDS}\nfoo: 1", "foo", "unknown key"),
    ("listeners: [{name: a, listen: ':1', bogus: 1}]", "listeners[0].bogus", "unknown key"),
    (
        "listeners: [{name: a, listen: ':1', idle_timeout: 5 parsecs}]",
        "listeners[0].idle_timeout",
        "duration",
    ),
    (
        "listeners: [{name: a, listen: ':1', detect: {timeout: -1s}}]",
        "listeners[0].detect.timeout",
        "duration",
    ),
    (
        f"listeners: [{{name: a, listen: ':1', default: nope}}]\n{BASE_BACKENDS}",
        "listeners[0].default",
        "no backend is called 'nope'",
    ),
    (
        f"listeners: [{BASE_LISTENER}, {BASE_LISTENER}]\n{BASE_BACKENDS}",
        "listeners[1].name",
        "duplicate listener name",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {source: 10.0.0.0/33}, "
        "reject: true}]}]",
        "listeners[0].routes[0].match.source",
        "CIDR",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{reject: true}, {match: "
        "{protocol: tls, sni: [1.5, {}]}, reject: true}]}]",
        "listeners[0].routes[1].match.sni",
        "non-empty strings",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {hots: x}, reject: true}]}]",
        "listeners[0].routes[0].match.hots",
        "no installed detector produces field 'hots'",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {protocol: ssh, sni: x}, "
        "reject: true}]}]",
        "listeners[0].routes[0].match.sni",
        "protocol ssh never produces field 'sni'",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {protocol: [unknown, ssh], "
        "host: x}, reject: true}]}]",
        "listeners[0].routes[0].match.host",
        "protocol ssh or unknown never produces field 'host'",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], proxy_protocol: "
        "{version: v1, tlvs: [authority]}}}",
        "backends.b.proxy_protocol",
        "TLVs need version: v2",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], proxy_protocol: "
        "{version: v2, tlvs: [sni]}}}",
        "backends.b.proxy_protocol",
        "no TLV is called 'sni'",
    ),
    (
        f"listeners: [{{name: a, listen: ':1', routes: [{{reject: true, fallback: b}}]}}]\n"
        f"{BASE_BACKENDS}",
        "listeners[0].routes[0].fallback",
        "names another backend",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: [{{address: 'h:1', "
        "backup: maybe}]}}",
        "backends.b.servers[0]",
        "true or false",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], health_check: "
        "{probe: smtp}}}",
        "backends.b.health_check.probe",
        "must be one of",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], health_check: "
        "{probe: content}}}",
        "backends.b.health_check.expect",
        "needs a regular expression",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], health_check: "
        "{probe: http, send: x}}}",
        "backends.b.health_check.send",
        "for probe: content only",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], health_check: "
        "{probe: content, expect: '(a+)+'}}}",
        "backends.b.health_check.expect",
        "exponential time",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], health_check: "
        "{probe: http, expect_status: [2xx, 600]}}}",
        "backends.b.health_check.expect_status",
        "status classes",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], health_check: "
        "{probe: http, path: 'no slash'}}}",
        "backends.b.health_check.path",
        "starting with /",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\n{BASE_BACKENDS}\nstate_file: relative.json",
        "state_file",
        "absolute file path",
    ),
    (
        f"listeners: [{{name: a, transport: udp, listen: ':1', routes: [{{match: {{}}, backend: b, "
        f"max_connections: 3}}]}}]\n{BASE_BACKENDS}",
        "listeners[0].routes[0].max_connections",
        "is for tcp listeners",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {pp_authority: x}, reject: true}]}]",
        "listeners[0].routes[0].match.pp_authority",
        "needs accept_proxy_protocol",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], "
        "quic_lb: {server_id_length: 2}}}",
        "backends.b.servers[0].quic_lb_id",
        "an ID of 2 octets for every server",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: [{{address: 'h:1', "
        "quic_lb_id: '01'}, {address: 'h:2', quic_lb_id: '01'}], quic_lb: {}}}",
        "backends.b.servers[1].quic_lb_id",
        "the same ID as servers[0]",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: {{srv: x, file: /y}}}}}}",
        "backends.b.servers",
        "{srv: _service._tcp.NAME} or {file: PATH}",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: {{file: relative.yaml}}}}}}",
        "backends.b.servers",
        "absolute path",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: {{srv: 'bad name!'}}}}}}",
        "backends.b.servers",
        "a DNS name",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\n{BASE_BACKENDS}\ndns: {{servers: ['10.0.0.1:99999']}}",
        "dns.servers",
        "1-65535",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {sni: {regex: '(a+)+$'}}, "
        "reject: true}]}]",
        "listeners[0].routes[0].match.sni",
        "exponential time",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {sni: {regex: '(x|xx)*'}}, "
        "reject: true}]}]",
        "listeners[0].routes[0].match.sni",
        "exponential time",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {sni: {regex: '(unclosed'}}, "
        "reject: true}]}]",
        "listeners[0].routes[0].match.sni",
        "not a regular expression",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {sni: {regexp: x}}, reject: true}]}]",
        "listeners[0].routes[0].match.sni",
        "{regex: '...'}",
    ),
    (
        "listeners: [{name: a, listen: ':1', rate_per_source: 5}]",
        "listeners[0].rate_per_source",
        "{rate: N, burst: N}",
    ),
    (
        "listeners: [{name: a, listen: ':1', rate_per_source: {rate: 0}}]",
        "listeners[0].rate_per_source",
        "a number from",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {protocol: htp1}, reject: true}]}]",
        "listeners[0].routes[0].match.protocol",
        "no installed tcp detector",
    ),
    (
        "listeners: [{name: a, listen: ':1', routes: [{match: {}}]}]",
        "listeners[0].routes[0]",
        "exactly one of backend",
    ),
    (
        "listeners: [{name: a, listen: ':1', detect: {protocols: [tls, smtp]}}]",
        "listeners[0].detect.protocols",
        "'smtp'",
    ),
    ("listeners: [{name: a, listen: 'tcp:notaport'}]", "listeners[0].listen", "bad endpoint"),
    ("listeners: [{name: a, listen: '127.0.0.1:70000'}]", "listeners[0].listen", "1-65535"),
    (
        "listeners: [{name: a, listen: ':1', transport: sctp}]",
        "listeners[0].transport",
        "must be one of",
    ),
    (
        "listeners: [{name: a, listen: ':1', relay: turbo}]",
        "listeners[0].relay",
        "must be one of copy, splice",
    ),
    (
        "listeners: [{name: a, transport: udp, listen: ':1', relay: splice}]",
        "listeners[0].relay",
        "unknown key",
    ),
    (
        "listeners: [{name: a, transport: udp, listen: ':1', max_connections: 5}]",
        "listeners[0].max_connections",
        "is for tcp listeners",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: []}}}}",
        "backends.b.servers",
        "non-empty list",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['nohost']}}}}",
        "backends.b.servers[0]",
        "host:port",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\nbackends: {{b: {{servers: ['h:1'], balance: fastest}}}}",
        "backends.b.balance",
        "round_robin",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\n{BASE_BACKENDS}\nlimits: {{max_connections: 0}}",
        "limits.max_connections",
        "at least 1",
    ),
    (
        f"listeners: [{BASE_LISTENER}]\n{BASE_BACKENDS}\nlogging: {{format: xml}}",
        "logging.format",
        "text, json",
    ),
    ("listeners: []", "listeners", "non-empty list"),
    ("{}", "listeners", "is required"),
    ("[1, 2]", "", "must be a mapping"),
]


@pytest.mark.parametrize("text, path, reason", BAD, ids=[b[1] or "top" for b in BAD])
def test_bad_config_names_the_key_path(text, path, reason):
    with pytest.raises(ConfigError) as raised:
        parse(text)
    assert any(p.endswith(path) and reason in r for p, r in raised.value.problems), (
        raised.value.problems
    )


def test_a_field_any_of_the_route_protocols_produces_is_accepted():
    config = parse(
        "listeners: [{name: a, listen: ':1', routes: [{match: {protocol: [tls, ssh], "
        "sni: x}, reject: true}, {match: {host: y}, reject: true}]}]"
    )
    assert [route.match.fields[0][0] for route in config.listeners[0].routes] == ["sni", "host"]


def test_a_route_an_earlier_one_shadows_is_warned_about():
    config = parse("""
listeners:
  - name: a
    listen: ":1"
    routes:
      - {match: {protocol: http1}, reject: true}
      - {match: {protocol: http1, host: x.example}, reject: true}
      - {match: {protocol: tls, sni: "*.example.com"}, reject: true}
      - {match: {protocol: tls, sni: [a.example.com, "*.example.com"]}, reject: true}
      - {match: {protocol: tls, sni: example.com}, reject: true}
      - {match: {source: 10.0.0.0/8}, reject: true}
      - {match: {protocol: tls, source: 10.1.0.0/16}, reject: true}
      - {match: {protocol: [tls, ssh]}, reject: true}
""")
    assert [w.split(":")[0] for w in config.warnings] == [
        "listeners[0].routes[1]",
        "listeners[0].routes[3]",
        "listeners[0].routes[6]",
    ]
    assert "routes[0] before it matches every connection it would" in config.warnings[0]


def test_regular_expressions_match_whole_values_beside_globs():
    from l4router.connection.routing import RouteTable
    from l4router.detection.decision import Decision

    config = parse(r"""
listeners:
  - name: a
    listen: ":1"
    routes:
      - name: tenants
        match: {protocol: tls, sni: [{regex: '[a-z0-9-]+\.tenants\.example'}, "*.other.org"]}
        backend: b
    default: reject
backends:
  b: {servers: ["127.0.0.1:2"]}
""")
    table = RouteTable(config.listeners[0])

    def route(sni):
        return table.choose(Decision("tls", {"sni": sni}), "192.0.2.1").route

    assert route("acme-1.tenants.example") == "tenants"
    assert route("ACME.Tenants.Example") == "tenants"  # case-insensitive, as globs
    assert route("acme.tenants.example.evil.com") == "default"  # anchored: the whole value
    assert route("a.b.tenants.example") == "default"
    assert route("x.other.org") == "tenants"


def test_every_problem_is_reported_at_once():
    text = (
        "listeners: [{name: a, listen: ':1', idle_timeout: x, default: nope, zap: 1}]\n"
        "backends: {b: {servers: ['127.0.0.1:0']}}"
    )
    with pytest.raises(ConfigError) as raised:
        parse(text)
    paths = [p for p, _ in raised.value.problems]
    assert set(paths) >= {
        "listeners[0].idle_timeout",
        "listeners[0].default",
        "listeners[0].zap",
        "backends.b.servers[0]",
    }


def test_a_config_parsed_from_the_same_text_is_used_again_and_a_changed_text_is_parsed(tmp_path):
    """A worker reads the supervisor's snapshot of the config it already parsed: it takes
    that Config (under its own path) instead of parsing again; a different text is parsed."""
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    parsed = parse_config(GOOD, DETECTORS, source="/etc/l4router.yaml")
    again = load_config(str(path), DETECTORS, parsed)
    assert again.listeners is parsed.listeners  # the same objects, not a second parse
    assert again.source == str(path)
    assert again.digest == parsed.digest

    path.write_text(GOOD.replace("max_connections: 10", "max_connections: 11"))
    changed = load_config(str(path), DETECTORS, parsed)
    assert changed.listeners[0].max_connections == 11
    assert changed.digest != parsed.digest
