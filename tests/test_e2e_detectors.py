"""Detectors end to end through the real router process, with real clients and servers:
grpcio, curl over h2c, SOAP and JSON-RPC POSTs, OpenSSH, PROXY protocol v2, drop-in plugins."""

import os
import socket
import subprocess
import time

import pytest

from l4router.parsers.proxyprotocol import v2_header
from tests.captures import capture
from tests.grpc_peers import greeter_server, say_hello
from tests.h2_peer import serve_h2c
from tests.support import (
    TWISTD,
    Backend,
    Router,
    free_port,
    http_reply_with_name,
    reply_with_name,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grpcio_client_routed_by_grpc_service(tmp_path):
    greeter, greeter_port = greeter_server("greeter", "helloworld.Greeter")
    guide, guide_port = greeter_server("guide", "routeguide.RouteGuide")
    try:
        port = free_port()
        config = f"""
listeners:
  - name: rpc
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: grpc, grpc_service: "helloworld.*"}}
        backend: greeter
      - match: {{protocol: grpc, grpc_service: routeguide.RouteGuide}}
        backend: guide
    default: reject
backends:
  greeter: {{servers: ["127.0.0.1:{greeter_port}"]}}
  guide: {{servers: ["127.0.0.1:{guide_port}"]}}
"""
        with Router(tmp_path, config) as router:
            assert say_hello(port, "helloworld.Greeter", b"one") == b"greeter:one"
            assert say_hello(port, "routeguide.RouteGuide", b"two") == b"guide:two"
            assert say_hello(port, "helloworld.Greeter", b"three") == b"greeter:three"
            events = router.wait_access_events(3)
            services = sorted(e["fields"]["grpc_service"] for e in events)
            assert services == ["helloworld.Greeter", "helloworld.Greeter", "routeguide.RouteGuide"]
            assert (
                router.metric(
                    "l4router_connections_routed_total",
                    listener="rpc",
                    protocol="grpc",
                    route="routes[1]",
                    backend="guide",
                )
                == 1
            )
    finally:
        greeter.stop(None)
        guide.stop(None)


def test_curl_h2c_routed_by_authority(tmp_path):
    with Backend("one", serve_h2c) as one, Backend("two", serve_h2c) as two:
        port = free_port()
        config = f"""
listeners:
  - name: h2
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: h2c, authority: "one.example"}}
        backend: one
      - match: {{protocol: h2c, authority: "*.two.example"}}
        backend: two
    default: reject
backends:
  one: {{servers: ["127.0.0.1:{one.port}"]}}
  two: {{servers: ["127.0.0.1:{two.port}"]}}
"""
        with Router(tmp_path, config):

            def curl(host, path):
                return subprocess.run(
                    [
                        "curl",
                        "-sS",
                        "--http2-prior-knowledge",
                        "-H",
                        f"Host: {host}",
                        f"http://127.0.0.1:{port}{path}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout

            assert curl("one.example", "/a") == "one one.example /a"
            assert curl("api.two.example", "/b") == "two api.two.example /b"
            assert (one.connections, two.connections) == (1, 1)


def test_soap_and_jsonrpc_posts_go_to_their_own_backends(tmp_path):
    with (
        Backend("soap", http_reply_with_name) as soap,
        Backend("rpc", http_reply_with_name) as rpc,
        Backend("web", http_reply_with_name) as web,
    ):
        port = free_port()
        config = f"""
listeners:
  - name: api
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: soap, soap_action: "*GetLastTradePrice"}}
        backend: soap
      - match: {{protocol: jsonrpc, jsonrpc_method: "eth_*"}}
        backend: rpc
      - match: {{protocol: [http1, jsonrpc]}}  # other JSON-RPC methods: the web app
        backend: web
    default: reject
backends:
  soap: {{servers: ["127.0.0.1:{soap.port}"]}}
  rpc: {{servers: ["127.0.0.1:{rpc.port}"]}}
  web: {{servers: ["127.0.0.1:{web.port}"]}}
"""
        with Router(tmp_path, config):

            def curl(*args):
                return subprocess.run(
                    ["curl", "-sS", *args], capture_output=True, text=True, timeout=20
                ).stdout

            url = f"http://127.0.0.1:{port}"
            assert (
                curl(
                    f"{url}/quote",
                    "-H",
                    "Content-Type: text/xml",
                    "-H",
                    'SOAPAction: "urn:x#GetLastTradePrice"',
                    "--data-binary",
                    "<Envelope/>",
                )
                == "soap /quote"
            )
            assert (
                curl(
                    f"{url}/rpc",
                    "-H",
                    "Content-Type: application/json",
                    "--data-binary",
                    '{"jsonrpc":"2.0","method":"eth_chainId","id":7}',
                )
                == "rpc /rpc"
            )
            assert (
                curl(
                    f"{url}/rpc",
                    "-H",
                    "Content-Type: application/json",
                    "--data-binary",
                    '{"jsonrpc":"2.0","method":"net_version","id":8}',
                )
                == "web /rpc"
            )
            assert curl(f"{url}/page") == "web /page"
            assert b"GetLastTradePrice" in soap.results[0]
            assert b'"eth_chainId"' in rpc.results[0]


def test_openssh_client_routed_to_a_real_sshd(tmp_path, sshd):
    sshd_port, key = sshd
    with Backend("web", http_reply_with_name) as web:
        port = free_port()
        config = f"""
listeners:
  - name: shared
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: ssh, ssh_software: "OpenSSH_*"}}
        backend: ssh
      - match: {{protocol: http1}}
        backend: web
    default: reject
backends:
  ssh: {{servers: ["127.0.0.1:{sshd_port}"]}}
  web: {{servers: ["127.0.0.1:{web.port}"]}}
"""
        with Router(tmp_path, config) as router:
            user = os.environ.get("USER") or "root"
            result = subprocess.run(
                [
                    "ssh",
                    "-i",
                    str(key),
                    "-p",
                    str(port),
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    f"{user}@127.0.0.1",
                    "echo through-the-router",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.stdout.strip() == "through-the-router", result.stderr
            event = router.wait_access_events(1)[0]
            assert event["protocol"] == "ssh" and event["backend"] == "ssh"
            assert event["fields"]["ssh_software"].startswith("OpenSSH_")


def test_proxy_v2_connection_routed_by_the_source_it_carries(tmp_path):
    with (
        Backend("inside", reply_with_name) as inside,
        Backend("outside", reply_with_name) as outside,
    ):
        port = free_port()
        config = f"""
listeners:
  - name: behind_lb
    listen: "127.0.0.1:{port}"
    accept_proxy_protocol: {{from: [127.0.0.0/8]}}
    routes:
      - match: {{source: "203.0.113.0/24"}}
        backend: inside
    default: outside
backends:
  inside: {{servers: ["127.0.0.1:{inside.port}"]}}
  outside: {{servers: ["127.0.0.1:{outside.port}"]}}
"""
        with Router(tmp_path, config) as router:

            def send(header):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    client.sendall(header + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    return client.recv(1024)

            assert (
                send(v2_header("203.0.113.50", 40001, "127.0.0.1", port))
                == b"inside:GET / HTTP/1.1"
            )
            assert send(v2_header("2001:db8::5", 40002, "::1", port)) == b"outside:GET / HTTP/1.1"
            assert send(b"") == b""  # no header: rejected
            events = router.wait_access_events(3)
            assert [(e["source"], e["source_port"]) for e in events[:2]] == [
                ("203.0.113.50", 40001),
                ("2001:db8::5", 40002),
            ]
            assert (
                router.metric(
                    "l4router_connections_rejected_total",
                    listener="behind_lb",
                    reason="proxy_protocol",
                )
                == 1
            )


def test_dropped_in_plugin_routes_and_a_broken_one_is_skipped(tmp_path):
    broken = tmp_path / "broken" / "l4router" / "plugins"
    broken.mkdir(parents=True)
    (broken / "broken_detector.py").write_text("raise ImportError('this plugin is broken')\n")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.join(CHECKOUT, "examples", "plugins"), str(tmp_path / "broken")]
        ),
    )
    listing = subprocess.run(
        [TWISTD, "l4router", "--list-detectors"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert listing.returncode == 0
    assert "memcached" in listing.stdout and "tls" in listing.stdout
    with Backend("cache", reply_with_name) as cache:
        port = free_port()
        config = f"""
listeners:
  - name: cache
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: memcached, memcached_command: get}}
        backend: cache
    default: reject
backends:
  cache: {{servers: ["127.0.0.1:{cache.port}"]}}
"""
        with Router(tmp_path, config, env=env) as router:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"get user:42\r\n")
                assert client.recv(100) == b"cache:get user:42"
        assert "this plugin is broken" in router.log_text()


H2C_CONFIG = """
listeners:
  - name: h2
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 5s}}
    routes:
      - match: {{protocol: [h2c, grpc], authority: h2.example.com}}
        backend: recorder
    default: reject
backends:
  recorder: {{servers: ["127.0.0.1:{recorder}"]}}
"""


def record_everything(backend, connection):
    received = b""
    while data := connection.recv(65536):
        received += data
    backend.record(received)


def test_h2c_in_random_small_segments_from_a_client_that_never_reads_is_routed(tmp_path):
    import random

    flight = capture("h2c_curl.bin")
    generator = random.Random(13)
    with Backend("recorder", record_everything) as recorder:
        port = free_port()
        with Router(tmp_path, H2C_CONFIG.format(port=port, recorder=recorder.port)) as router:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                start = 0
                while start < len(flight):
                    end = start + generator.randint(1, 12)
                    client.sendall(flight[start:end])
                    start = end
                    time.sleep(0.001)
                wait_until(lambda: recorder.connections == 1, message="the route")
                client.shutdown(socket.SHUT_WR)
                wait_until(lambda: recorder.results, message="the backend's bytes")
            assert recorder.results == [flight]  # nothing elicited, nothing removed
            event = router.wait_access_events(1)[0]
            assert event["protocol"] == "h2c" and event["route"] == "routes[0]"


def test_an_ack_of_the_elicited_settings_arriving_after_the_decision_is_removed(tmp_path):
    from l4router.parsers.http2 import EMPTY_SETTINGS, SETTINGS_ACK

    flight = capture("h2c_curl.bin")
    preface_and_settings = 24 + 9 + int.from_bytes(flight[24:27], "big")
    with Backend("recorder", record_everything) as recorder:
        port = free_port()
        with Router(tmp_path, H2C_CONFIG.format(port=port, recorder=recorder.port)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(flight[:preface_and_settings])
                assert client.recv(100) == EMPTY_SETTINGS  # quiet: the router draws it out
                client.sendall(flight[preface_and_settings:])  # HEADERS: decided
                wait_until(lambda: recorder.connections == 1, message="the route")
                client.sendall(
                    SETTINGS_ACK + b"\x00\x00\x00\x08\x00\x00\x00\x00\x00" + SETTINGS_ACK
                )  # ours, a WINDOW_UPDATE-sized frame, the backend's
                client.shutdown(socket.SHUT_WR)
                wait_until(lambda: recorder.results, message="the backend's bytes")
            assert recorder.results == [
                flight + b"\x00\x00\x00\x08\x00\x00\x00\x00\x00" + SETTINGS_ACK
            ]
