"""Service discovery: servers from a watched file and from DNS SRV records (a real DNS server
the test runs, dnspython on the wire), changing while clients connect."""

import os
import ssl
import time

import pytest
import trustme

from tests.dns_peer import DNSServer
from tests.support import Backend, Router, free_port, wait_until
from tests.test_e2e_control import SteadyClients, name_then_echo
from tests.test_e2e_tcp import tls_client

pytestmark = pytest.mark.timeout(120)


def listener(port):
    return (
        f'listeners:\n  - name: front\n    listen: "127.0.0.1:{port}"\n'
        "    detect: {timeout: 100ms}\n    default: app\n"
    )


def replace_file(path, text):
    """As consul-template does: write aside, rename over."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


def test_a_watched_file_changes_the_servers_and_a_broken_one_keeps_the_last_good_set(tmp_path):
    servers = tmp_path / "servers.json"
    with Backend("a", name_then_echo) as a, Backend("b", name_then_echo) as b:
        servers.write_text(f'["127.0.0.1:{a.port}"]')
        port = free_port()
        config = listener(port) + (
            f"backends:\n  app: {{servers: {{file: {servers}, refresh: 100ms}}}}\n"
        )
        with Router(tmp_path, config) as router, SteadyClients(port) as clients:
            wait_until(lambda: clients.latest() == {"a"}, message="clients on a")
            replace_file(servers, f"- {{address: 127.0.0.1:{b.port}, weight: 2}}\n")  # YAML
            wait_until(lambda: clients.latest() == {"b"}, message="clients on b")
            replace_file(servers, "[not valid")
            wait_until(
                lambda: (
                    router.metric("l4router_backend_discovery_failures_total", backend="app") == 1
                ),
                message="the failure counted",
            )
            time.sleep(0.5)
            assert clients.latest(10) == {"b"}
            assert router.metric("l4router_backend_discovery_servers", backend="app") == 1
    assert not clients.failures(), clients.failures()[:3]
    messages = [e.get("log_format", "") for e in router.events()]
    assert sum(m.startswith("Backend {backend}: {source} gives") for m in messages) == 2
    assert any(m.startswith("Backend {backend}: {source} failed") for m in messages)


def test_srv_records_give_servers_tiers_and_ports_and_follow_their_changes(tmp_path):
    with (
        Backend("a", name_then_echo) as a,
        Backend("b", name_then_echo) as b,
        DNSServer() as dns_server,
    ):
        dns_server.addresses = {"a.test.": "127.0.0.1", "b.test.": "127.0.0.1"}
        dns_server.srv = [(0, 5, a.port, "a.test.")]
        port = free_port()
        config = listener(port) + (
            "backends:\n  app: {servers: {srv: _app._tcp.test, refresh: 1s}}\n"
            f'dns: {{servers: ["127.0.0.1:{dns_server.port}"], timeout: 1s}}\n'
        )
        with Router(tmp_path, config) as router, SteadyClients(port) as clients:
            wait_until(lambda: clients.latest() == {"a"}, message="clients on a")
            # b takes priority 0; a becomes the backup tier (priority 10).
            dns_server.srv = [(0, 5, b.port, "b.test."), (10, 5, a.port, "a.test.")]
            wait_until(lambda: clients.latest() == {"b"}, timeout=15, message="clients on b")
            backends = router.get("/status/backends").decode()
            assert '"backup": true' in backends and f"127.0.0.1:{a.port}" in backends
            dns_server.failing = True
            wait_until(
                lambda: (
                    router.metric("l4router_backend_discovery_failures_total", backend="app") >= 1
                ),
                timeout=15,
                message="the failed lookup counted",
            )
            assert clients.latest(10) == {"b"}
            assert router.metric("l4router_backend_discovery_servers", backend="app") == 2
    assert not clients.failures(), clients.failures()[:3]


def tls_backend(ca, name, hostnames, host, port):
    """A real TLS server (Python ssl) on host:port: after the handshake it says its name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hostnames).configure_cert(context)

    def handle(backend, connection):
        with context.wrap_socket(connection, server_side=True) as tls:
            tls.sendall(f"{backend.name} here".encode())
            tls.recv(1)

    return Backend(name, handle, host=host, port=port)


def test_a_backend_named_by_sni_within_allow_and_never_an_open_relay(tmp_path):
    """Two names resolve (through a real DNS server) to two local TLS servers and are routed
    there; a name outside allow is refused before any lookup; an unresolvable one is refused
    with its own reason; a name already resolved is not asked again."""
    ca = trustme.CA()
    one_port = free_port("127.0.0.2")
    with (
        tls_backend(ca, "one", ["*.apps.test"], "127.0.0.2", one_port) as one,
        tls_backend(ca, "two", ["*.apps.test"], "127.0.0.3", one_port) as two,
        DNSServer() as dns_server,
    ):
        dns_server.addresses = {
            "one.apps.test.": "127.0.0.2",
            "two.apps.test.": "127.0.0.3",
            "outside.example.": "127.0.0.2",
        }
        port = free_port()
        config = f"""
listeners:
  - name: edge
    listen: "127.0.0.1:{port}"
    routes: [{{match: {{protocol: tls}}, backend: by_name}}]
    default: reject
backends:
  by_name: {{server_from: "{{sni}}:{one_port}", allow: ["*.apps.test"], resolve_timeout: 1s}}
dns: {{servers: ["127.0.0.1:{dns_server.port}"]}}
"""
        with Router(tmp_path, config) as router:
            assert tls_client(ca, port, "one.apps.test").startswith("one ")
            assert tls_client(ca, port, "two.apps.test").startswith("two ")
            assert tls_client(ca, port, "one.apps.test").startswith("one ")
            queries_before = dns_server.questions.copy()
            for refused_name in ("outside.example", "nope.apps.test"):
                with pytest.raises((ssl.SSLError, OSError)):
                    tls_client(ca, port, refused_name)

            def rejected(reason):
                return router.metric(
                    "l4router_connections_rejected_total", listener="edge", reason=reason
                )

            wait_until(
                lambda: rejected("name_not_allowed") == 1 and rejected("name_unresolved") == 1,
                message="both refusals counted",
            )
            lookups = {
                outcome: router.metric(
                    "l4router_backend_named_lookups_total", backend="by_name", outcome=outcome
                )
                for outcome in ("cached", "resolved", "name_not_allowed", "name_unresolved")
            }
            servers = [e["server"] for e in router.wait_access_events(5)]
    assert lookups == {"cached": 1, "resolved": 2, "name_not_allowed": 1, "name_unresolved": 1}
    assert queries_before.count("one.apps.test.") == 1  # the second client used the cache
    assert "outside.example." not in dns_server.questions  # never looked up
    assert sorted(s for s in servers if s) == sorted(
        [f"one.apps.test:{one_port}"] * 2 + [f"two.apps.test:{one_port}"]
    )
    assert one.connections == 2 and two.connections == 1


def test_a_named_group_of_the_route_names_the_server(tmp_path):
    """`server_from: "{tenant}.internal.test:PORT"` with the route's regex capturing
    `tenant` from the SNI: the server is the tenant's, fenced by allow on the name made."""
    ca = trustme.CA()
    port_of_servers = free_port("127.0.0.2")
    with (
        tls_backend(ca, "one", ["*.apps.test"], "127.0.0.2", port_of_servers),
        tls_backend(ca, "two", ["*.apps.test"], "127.0.0.3", port_of_servers),
        DNSServer() as dns_server,
    ):
        dns_server.addresses = {
            "one.internal.test.": "127.0.0.2",
            "two.internal.test.": "127.0.0.3",
        }
        port = free_port()
        config = f"""
listeners:
  - name: edge
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{sni: {{regex: '(?P<tenant>[a-z]+)\\.apps\\.test'}}}}
        backend: tenants
    default: reject
backends:
  tenants: {{server_from: "{{tenant}}.internal.test:{port_of_servers}",
             allow: ["*.internal.test"]}}
dns: {{servers: ["127.0.0.1:{dns_server.port}"]}}
"""
        with Router(tmp_path, config) as router:
            assert tls_client(ca, port, "one.apps.test").startswith("one ")
            assert tls_client(ca, port, "two.apps.test").startswith("two ")
            servers = [e["server"] for e in router.wait_access_events(2)]
    assert servers == [
        f"one.internal.test:{port_of_servers}",
        f"two.internal.test:{port_of_servers}",
    ]
    assert "one.apps.test." not in dns_server.questions
