"""End to end over TCP: the real `twistd -n l4router` process, real clients, real servers."""

import socket
import ssl
import threading
import time

import pytest
import trustme

from tests.captures import capture
from tests.support import (
    Backend,
    Router,
    free_port,
    http_reply_with_name,
    pseudo_random_stream,
    read_to_end,
    reply_with_name,
    send_stream,
    started_daemon,
    stream_digest,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def tls_backend(ca, name, hostnames):
    """A real TLS server (Python ssl): after the handshake it sends its name and the ALPN."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hostnames).configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])

    def handle(backend, connection):
        with context.wrap_socket(connection, server_side=True) as tls:
            backend.record(tls.selected_alpn_protocol())
            tls.sendall(f"{backend.name} alpn={tls.selected_alpn_protocol()}".encode())
            tls.recv(1)

    return Backend(name, handle)


def tls_client(ca, port, server_name, alpn=None):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.recv(1024).decode()


def segmented_tls_client(ca, port, server_name, segments):
    """A real Python ssl client whose ClientHello is written through `segments(hello)`."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        for piece in segments(outgoing.read()):
            raw.sendall(piece)
            time.sleep(0.001)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                data = raw.recv(65536)
                assert data, "router or backend closed during the handshake"
                incoming.write(data)
        raw.sendall(outgoing.read())
        while True:
            try:
                return tls.read(1024).decode()
            except ssl.SSLWantReadError:
                incoming.write(raw.recv(65536))


def two_records(hello):
    """The same ClientHello handshake message carried in two TLS records."""
    body = hello[5:]
    cut = len(body) // 3
    return [
        hello[:3]
        + cut.to_bytes(2, "big")
        + body[:cut]
        + hello[:3]
        + (len(body) - cut).to_bytes(2, "big")
        + body[cut:]
    ]


TLS_CONFIG = """
listeners:
  - name: edge
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: tls, sni: "alpn.example.com", alpn: h2}}
        backend: b
      - match: {{protocol: tls, sni: ["*.a.example.com", "a.example.com"]}}
        backend: a
      - match: {{protocol: tls, sni: "*.example.com"}}
        backend: b
    default: reject
backends:
  a: {{servers: ["127.0.0.1:{a}"]}}
  b: {{servers: ["127.0.0.1:{b}"]}}
"""


def test_tls_routed_by_sni_and_alpn_with_handshakes_completing(tmp_path, ca):
    with (
        tls_backend(ca, "A", ["a.example.com", "*.a.example.com"]) as a,
        tls_backend(ca, "B", ["b.example.com", "alpn.example.com"]) as b,
    ):
        port = free_port()
        with Router(tmp_path, TLS_CONFIG.format(port=port, a=a.port, b=b.port)) as router:
            assert tls_client(ca, port, "a.example.com") == "A alpn=None"
            assert tls_client(ca, port, "www.a.example.com") == "A alpn=None"
            assert tls_client(ca, port, "B.Example.com", ["http/1.1"]) == "B alpn=http/1.1"
            assert tls_client(ca, port, "alpn.example.com", ["h2"]) == "B alpn=h2"
            # The same name without h2 falls through to the generic rule, still B.
            assert tls_client(ca, port, "alpn.example.com", ["http/1.1"]) == "B alpn=http/1.1"
            assert (a.connections, b.connections) == (2, 3)
            events = router.wait_access_events(5)
            first = events[0]
            assert first["protocol"] == "tls" and first["fields"]["sni"] == "a.example.com"
            assert first["backend"] == "a" and first["server"] == f"127.0.0.1:{a.port}"
            assert first["reason"] in ("completed", "client_closed", "backend_closed")
            assert first["bytes_up"] > 200 and first["bytes_down"] > 500
            assert (
                router.metric(
                    "l4router_connections_routed_total",
                    listener="edge",
                    protocol="tls",
                    route="routes[0]",
                    backend="b",
                )
                == 1
            )


@pytest.mark.parametrize(
    "segments",
    [
        pytest.param(
            lambda hello: [hello[i : i + 1] for i in range(len(hello))], id="byte-per-segment"
        ),
        pytest.param(two_records, id="two-records"),
    ],
)
def test_fragmented_client_hello_still_routed_by_sni(tmp_path, ca, segments):
    with tls_backend(ca, "A", ["a.example.com"]) as a, tls_backend(ca, "B", ["b.example.com"]) as b:
        port = free_port()
        with Router(tmp_path, TLS_CONFIG.format(port=port, a=a.port, b=b.port)):
            assert segmented_tls_client(ca, port, "a.example.com", segments) == "A alpn=None"
            assert segmented_tls_client(ca, port, "b.example.com", segments) == "B alpn=None"


HTTP_CONFIG = """
listeners:
  - name: web
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: http1, path: "/api/*"}}
        backend: api
      - match: {{protocol: http1, host: "*.shop.example"}}
        backend: shop
      - match: {{protocol: http1, host: "blocked.example"}}
        reject: true
    default: fallback
backends:
  api: {{servers: ["127.0.0.1:{api}"]}}
  shop: {{servers: ["127.0.0.1:{shop}"]}}
  fallback: {{servers: ["127.0.0.1:{fallback}"]}}
"""


def http_exchange(port, request):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(request)
        response = b""
        while chunk := client.recv(65536):
            response += chunk
        return response


def test_http1_routed_by_host_and_path_and_no_host_goes_to_default(tmp_path):
    with (
        Backend("api", http_reply_with_name) as api,
        Backend("shop", http_reply_with_name) as shop,
        Backend("fallback", http_reply_with_name) as fallback,
    ):
        port = free_port()
        config = HTTP_CONFIG.format(port=port, api=api.port, shop=shop.port, fallback=fallback.port)
        with Router(tmp_path, config) as router:
            get = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n"
            assert http_exchange(port, get % (b"/api/v1", b"x.org")).endswith(b"api /api/v1")
            assert http_exchange(port, get % (b"/cart", b"WWW.Shop.Example:8080")).endswith(
                b"shop /cart"
            )
            assert http_exchange(port, get % (b"/", b"other.example")).endswith(b"fallback /")
            assert http_exchange(port, b"GET /nohost HTTP/1.0\r\n\r\n").endswith(
                b"fallback /nohost"
            )
            assert http_exchange(port, get % (b"/", b"blocked.example")) == b""
            assert shop.results[0] == get % (b"/cart", b"WWW.Shop.Example:8080")
            assert (
                router.metric(
                    "l4router_connections_rejected_total", listener="web", reason="rejected"
                )
                == 1
            )
            assert (
                router.metric(
                    "l4router_connections_routed_total",
                    listener="web",
                    protocol="http1",
                    route="default",
                    backend="fallback",
                )
                == 2
            )


def relay_config(port, backend_port, extra=""):
    return f"""
listeners:
  - name: bulk
    listen: "127.0.0.1:{port}"
    {extra}
    default: sink
backends:
  sink: {{servers: ["127.0.0.1:{backend_port}"]}}
"""


SIZE = 256 * 1024 * 1024
# Both relays pass the same tests: the copying one and the zero-copy splice(2) one.
RELAYS = pytest.mark.parametrize("relay", ["copy", "splice"])


@RELAYS
def test_256_mib_each_way_byte_exact(tmp_path, relay):
    def exchange(backend, connection):
        sender = threading.Thread(daemon=True, target=send_stream, args=(connection, 2, SIZE))
        sender.start()
        backend.record(read_to_end(connection))
        sender.join()
        connection.shutdown(socket.SHUT_WR)

    with Backend("sink", exchange) as backend:
        port = free_port()
        with Router(tmp_path, relay_config(port, backend.port, f"relay: {relay}")) as router:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                client.sendall(b"BULK")  # unknown protocol -> default
                result = {}
                reader = started_daemon(lambda: result.update(down=read_to_end(client)))
                send_stream(client, 1, SIZE)
                client.shutdown(socket.SHUT_WR)
                reader.join(120)
            assert result["down"] == (stream_digest(2, SIZE), SIZE)
            wait_until(lambda: backend.results, message="the backend's digest")
            upstream_digest, upstream_count = backend.results[0]
            assert upstream_count == SIZE + 4
            event = router.wait_access_events(1)[0]
            assert event["bytes_up"] == SIZE + 4 and event["bytes_down"] == SIZE
            assert event["reason"] == "completed"
            assert (
                router.metric(
                    "l4router_bytes_relayed_total", listener="bulk", direction="downstream"
                )
                == SIZE
            )


@RELAYS
def test_half_close_client_still_gets_the_whole_reply(tmp_path, relay):
    def answer_after_eof(backend, connection):
        digest, count = read_to_end(connection)
        backend.record((digest, count))
        send_stream(connection, 7, 8 * 1024 * 1024)
        connection.shutdown(socket.SHUT_WR)

    with Backend("sink", answer_after_eof) as backend:
        port = free_port()
        with Router(tmp_path, relay_config(port, backend.port, f"relay: {relay}")):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                client.sendall(b"GET /report HTTP/1.1\r\nHost: x\r\n\r\n")
                client.shutdown(socket.SHUT_WR)
                assert read_to_end(client) == (stream_digest(7, 8 * 1024 * 1024), 8 * 1024 * 1024)
            assert backend.results[0][1] == len(b"GET /report HTTP/1.1\r\nHost: x\r\n\r\n")


@RELAYS
def test_client_that_stops_reading_keeps_router_memory_bounded(tmp_path, relay):
    big = 512 * 1024 * 1024
    sent = []

    def flood(backend, connection):
        connection.recv(16)
        for block in pseudo_random_stream(3, big):
            connection.sendall(block)
            sent.append(len(block))
        connection.shutdown(socket.SHUT_WR)

    with Backend("flood", flood) as backend:
        port = free_port()
        with Router(tmp_path, relay_config(port, backend.port, f"relay: {relay}")) as router:
            before = router.rss_bytes()
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                client.sendall(b"START")
                wait_until(lambda: sum(sent) > 1024 * 1024, message="the flood to start")
                time.sleep(2)  # the client reads nothing meanwhile
                stalled = router.rss_bytes()
                # Only socket buffers fill up: the backend is paused long before 512 MiB.
                assert sum(sent) < 64 * 1024 * 1024, "the backend was never paused"
                assert stalled - before < 64 * 1024 * 1024, (before, stalled)
                assert read_to_end(client) == (stream_digest(3, big), big)


def test_silent_unknown_and_rejected_clients(tmp_path):
    with (
        Backend("slow", reply_with_name) as timeout_backend,
        Backend("other", reply_with_name) as other,
    ):
        port = free_port()
        config = f"""
listeners:
  - name: mixed
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 500ms}}
    routes:
      - match: {{protocol: tls}}
        reject: true
    on_timeout: server_first
    default: other
backends:
  server_first: {{servers: ["127.0.0.1:{timeout_backend.port}"]}}
  other: {{servers: ["127.0.0.1:{other.port}"]}}
"""
        with Router(tmp_path, config) as router:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
                started = time.monotonic()
                # A server-speaks-first backend would greet; ours answers once it gets bytes.
                time.sleep(0.8)
                assert timeout_backend.connections == 1
                assert time.monotonic() - started >= 0.5
                silent.sendall(b"HELO")
                assert silent.recv(100) == b"slow:HELO"
            assert (
                http_exchange(port, b"\x00\x01\x02 not a protocol")
                == b"other:\x00\x01\x02 not a protocol"
            )
            with socket.create_connection(("127.0.0.1", port), timeout=10) as tls_client_socket:
                tls_client_socket.sendall(capture("tls_curl.bin"))
                started = time.monotonic()
                assert tls_client_socket.recv(100) == b""
                assert time.monotonic() - started < 0.5
            metric = router.metric
            assert (
                metric(
                    "l4router_connections_routed_total",
                    listener="mixed",
                    protocol="timeout",
                    route="on_timeout",
                    backend="server_first",
                )
                == 1
            )
            assert (
                metric(
                    "l4router_connections_routed_total",
                    listener="mixed",
                    protocol="unknown",
                    route="default",
                    backend="other",
                )
                == 1
            )
            assert (
                metric(
                    "l4router_connections_routed_total",
                    listener="mixed",
                    protocol="tls",
                    route="routes[0]",
                    backend="reject",
                )
                == 1
            )
            assert (
                metric("l4router_connections_rejected_total", listener="mixed", reason="rejected")
                == 1
            )


def test_refusing_backend_closes_the_client_promptly_and_is_counted(tmp_path):
    dead_port = free_port()  # nothing listens there: connects are refused
    port = free_port()
    config = f"""
listeners:
  - name: edge
    listen: "127.0.0.1:{port}"
    default: dead
backends:
  dead:
    servers: ["127.0.0.1:{dead_port}"]
    connect_timeout: 1s
    retry: {{attempts: 3, initial_backoff: 100ms, multiplier: 2, jitter: 0}}
"""
    with Router(tmp_path, config) as router:
        started = time.monotonic()
        assert http_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        elapsed = time.monotonic() - started
        # Three refused attempts 100 ms then 200 ms apart: well inside connect_timeout.
        assert 0.3 <= elapsed < 1.0 + 0.5, elapsed
        assert (
            router.metric(
                "l4router_backend_connect_failures_total",
                backend="dead",
                server=f"127.0.0.1:{dead_port}",
                reason="refused",
            )
            == 3
        )
        assert router.metric("l4router_backend_retries_total", backend="dead") == 2
        assert (
            router.metric(
                "l4router_connections_rejected_total", listener="edge", reason="connect_failed"
            )
            == 1
        )
        warnings = [
            e
            for e in router.events()
            if e.get("backend") == "dead" and e.get("log_level") and e["log_level"].name == "warn"
        ]
        assert warnings and warnings[0]["reason"] == "connect_failed", router.log_text()
        attempts = [e["log_time"] for e in router.events() if e.get("attempt")]
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        assert len(gaps) == 2 and 0.09 < gaps[0] < 0.2 and 0.19 < gaps[1] < 0.3, gaps
        assert router.access_events()[0]["reason"] == "connect_failed"
