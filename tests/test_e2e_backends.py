"""Backends through the real router process: balancing, health, retries, pools, PROXY out."""

import collections
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme

from tests.support import (
    Backend,
    Router,
    ask,
    free_port,
    http_reply_with_name,
    listening,
    reply_with_name,
    running_nginx,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


def backends_config(port, servers, **backend):
    """One listener sending everything to backend `pool` made of `servers` ((port, weight))."""
    listed = ", ".join(f'{{address: "127.0.0.1:{p}", weight: {w}}}' for p, w in servers)
    extra = "".join(f"\n    {key}: {value}" for key, value in backend.items())
    return f"""
listeners:
  - name: front
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 200ms}}
    default: pool
backends:
  pool:
    servers: [{listed}]{extra}
"""


def names(replies):
    return collections.Counter(reply.split(b":", 1)[0].decode() for reply in replies)


def test_weighted_round_robin_splits_4000_connections_1_1_2(tmp_path):
    with (
        Backend("a", reply_with_name) as a,
        Backend("b", reply_with_name) as b,
        Backend("c", reply_with_name) as c,
    ):
        port = free_port()
        config = backends_config(port, [(a.port, 1), (b.port, 1), (c.port, 2)])
        with Router(tmp_path, config) as router:
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda i: ask(port, b"n%d" % i), range(4000)))
            counts = names(replies)
            for name, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
                assert abs(counts[name] - 4000 * share) <= 4000 * share * 0.05, counts
            assert (
                router.metric(
                    "l4router_connections_closed_total", listener="front", reason="completed"
                )
                + router.metric(
                    "l4router_connections_closed_total", listener="front", reason="backend_closed"
                )
                == 4000
            )


SOURCES = [f"127.0.0.{i}" for i in range(2, 42)]


def source_map(port):
    """Which backend each source address lands on, asked three times each."""
    mapping = {}
    for source in SOURCES:
        seen = {ask(port, b"x", source=source).split(b":")[0] for _ in range(3)}
        assert len(seen) == 1, (source, seen)  # sticky
        mapping[source] = seen.pop().decode()
    return mapping


def test_source_hash_is_sticky_and_removing_a_server_moves_only_its_sources(tmp_path):
    with (
        Backend("a", reply_with_name) as a,
        Backend("b", reply_with_name) as b,
        Backend("c", reply_with_name) as c,
    ):
        port = free_port()
        servers = [(a.port, 1), (b.port, 1), (c.port, 1)]
        with Router(tmp_path, backends_config(port, servers, balance="source_hash")):
            before = source_map(port)
        assert set(before.values()) == {"a", "b", "c"}
        (tmp_path / "second").mkdir()
        with Router(tmp_path / "second", backends_config(port, servers[:2], balance="source_hash")):
            after = source_map(port)
        moved = {s for s in SOURCES if before[s] != after[s]}
        assert moved == {s for s in SOURCES if before[s] == "c"}


def test_killed_backend_leaves_rotation_without_failing_clients_and_returns(tmp_path):
    a = Backend("a", reply_with_name).__enter__()
    b = Backend("b", reply_with_name).__enter__()
    c = Backend("c", reply_with_name).__enter__()
    c_port = c.port
    port = free_port()
    config = backends_config(
        port,
        [(a.port, 1), (b.port, 1), (c_port, 1)],
        health_check="{interval: 200ms, timeout: 200ms, rise: 2, fall: 2}",
        retry="{attempts: 3, initial_backoff: 20ms}",
    )
    results = []
    stop = threading.Event()

    def steady_stream():
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = ask(port, b"x", timeout=5)
            except OSError as exc:
                reply = exc
            results.append(((started, time.monotonic()), reply))
            time.sleep(0.005)

    try:
        with Router(tmp_path, config) as router:
            loader = threading.Thread(daemon=True, target=steady_stream)
            loader.start()
            time.sleep(0.8)
            killing_at = time.monotonic()
            c.__exit__(None, None, None)  # killed: its port now refuses
            killed_at = time.monotonic()
            wait_until(
                lambda: (
                    router.metric(
                        "l4router_backend_server_up", backend="pool", server=f"127.0.0.1:{c_port}"
                    )
                    == 0
                ),
                timeout=5,
                message="c marked down",
            )
            down_after = time.monotonic() - killed_at
            failures_when_down = router.metric(
                "l4router_backend_connect_failures_total",
                backend="pool",
                server=f"127.0.0.1:{c_port}",
                reason="refused",
            )
            time.sleep(1.0)
            # Down: no client connect goes to c any more (only health checks do).
            assert (
                router.metric(
                    "l4router_backend_connect_failures_total",
                    backend="pool",
                    server=f"127.0.0.1:{c_port}",
                    reason="refused",
                )
                == failures_when_down
            )
            c = Backend("c", reply_with_name, port=c_port).__enter__()
            restarted_at = time.monotonic()
            wait_until(lambda: c.connections > 0, timeout=5, message="c back in rotation")
            back_after = time.monotonic() - restarted_at
            time.sleep(0.3)
            stop.set()
            loader.join(10)
            events = router.events()
    finally:
        stop.set()
        for backend in (a, b, c):
            backend.__exit__(None, None, None)
    failed = [(span, r) for span, r in results if not isinstance(r, bytes) or not r.endswith(b":x")]
    # Only a connection c had already accepted when it died may fail (its bytes were sent, so
    # no retry can save it); every connect that c refused was retried elsewhere.
    assert len(results) > 200 and len(failed) <= 2, failed
    assert all(start <= killed_at and end >= killing_at for (start, end), _ in failed), failed
    assert down_after < 2 * 0.2 + 0.6, down_after  # fall=2 checks 200 ms apart, or passive
    assert back_after < 2 * 0.2 + 0.8, back_after  # rise=2 checks
    served = names(r for _, r in results if isinstance(r, bytes))  # the failed are above
    assert served["a"] and served["b"] and served["c"]
    transitions = [
        e["log_format"].split(": ")[0]
        for e in events
        if e.get("log_namespace") == "l4router.backends.server"
    ]
    assert transitions == [
        "Backend {backend} server {server} is down",
        "Backend {backend} server {server} is up",
    ], transitions


def test_retries_across_an_unanswering_and_a_refusing_server_follow_the_backoff(tmp_path):
    # A server whose accept queue is full never completes a handshake: connects time out.
    silent = socket.create_server(("127.0.0.1", 0), backlog=0)
    silent_port = silent.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the queue (its length varies): then a handshake does not complete
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", silent_port))
        except socket.timeout:
            probe.close()
            break
        fillers.append(probe)
    else:
        raise AssertionError("the silent server's accept queue never filled")
    refusing_port = free_port()
    port = free_port()
    config = backends_config(
        port,
        [(silent_port, 1), (refusing_port, 1)],
        connect_timeout="300ms",
        retry="{attempts: 3, initial_backoff: 100ms, multiplier: 2, jitter: 0}",
    )
    try:
        with Router(tmp_path, config) as router:
            started = time.monotonic()
            assert ask(port, b"x") == b""
            elapsed = time.monotonic() - started
            attempts = [e for e in router.events() if e.get("attempt")]
            metric = router.metric
            assert (
                metric(
                    "l4router_backend_connect_failures_total",
                    backend="pool",
                    server=f"127.0.0.1:{silent_port}",
                    reason="timeout",
                )
                == 2
            )
            assert (
                metric(
                    "l4router_backend_connect_failures_total",
                    backend="pool",
                    server=f"127.0.0.1:{refusing_port}",
                    reason="refused",
                )
                == 1
            )
            assert metric("l4router_backend_retries_total", backend="pool") == 2
    finally:
        silent.close()
        for filler in fillers:
            filler.close()
    # Each failure is logged when it happens: timeout after 300 ms; then 100 ms backoff and
    # an instant refusal; then 200 ms backoff and another 300 ms timeout.
    assert [e["reason"] for e in attempts] == ["timeout", "refused", "timeout"]
    times = [e["log_time"] for e in attempts]
    assert 0.08 < times[1] - times[0] < 0.2, times
    assert 0.45 < times[2] - times[1] < 0.65, times
    assert 0.9 < elapsed < 1.5


def delaying_forwarder(upstream_port, delay):
    """A Backend handler: every new connection takes `delay` seconds to be set up (the
    forwarder waits, then connects upstream) before bytes flow, like a distant server."""

    def forward(backend, connection):
        time.sleep(delay)
        with socket.create_connection(("127.0.0.1", upstream_port)) as upstream:

            def pump(source, sink):
                try:
                    while chunk := source.recv(65536):
                        sink.sendall(chunk)
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            other = threading.Thread(daemon=True, target=pump, args=(upstream, connection))
            other.start()
            pump(connection, upstream)
            other.join(10)

    return forward


def median_time_to_first_byte(port, clients=25):
    samples = []
    for _ in range(clients):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(100).startswith(b"origin:")
            samples.append(time.monotonic() - started)
        time.sleep(0.06)  # time for the pool to refill
    return statistics.median(samples)


def test_warm_pool_cuts_time_to_first_byte_behind_a_slow_connect(tmp_path):
    with (
        Backend("origin", reply_with_name) as origin,
        Backend("slow", delaying_forwarder(origin.port, 0.02)) as slow,
    ):
        port = free_port()
        cold = tmp_path / "cold"
        cold.mkdir()
        with Router(cold, backends_config(port, [(slow.port, 1)])):
            without_pool = median_time_to_first_byte(port)
        with Router(
            tmp_path,
            backends_config(
                port, [(slow.port, 1)], pool="{min_idle: 4, max_idle: 4, idle_timeout: 10s}"
            ),
        ) as router:
            time.sleep(0.3)
            with_pool = median_time_to_first_byte(port)
            hits = router.metric(
                "l4router_backend_pool_requests_total", backend="pool", result="hit"
            )
    assert without_pool - with_pool >= 0.015, (without_pool, with_pool)
    assert hits == 25


def test_a_spare_closed_by_its_server_is_never_handed_out(tmp_path):
    def closes_idle_connections(backend, connection):
        # Closes connections idle for 100 ms, as servers do, until it has closed six; from
        # then on it waits, so the clients below never race a close.
        connection.settimeout(0.1)
        while True:
            try:
                data = connection.recv(100)
                break
            except socket.timeout:
                with backend.lock:
                    if backend.results.count("closed idle") < 6:
                        backend.results.append("closed idle")
                        return
        connection.sendall(b"fresh:" + data)

    with Backend("fickle", closes_idle_connections) as fickle:
        port = free_port()
        config = backends_config(
            port, [(fickle.port, 1)], pool="{min_idle: 2, max_idle: 2, idle_timeout: 10s}"
        )
        with Router(tmp_path, config) as router:
            wait_until(
                lambda: fickle.results.count("closed idle") >= 6,
                timeout=10,
                message="the server to close spares",
            )
            replies = [ask(port, b"q%d" % i) for i in range(20)]
            discarded = fickle.results.count("closed idle")
            hits = router.metric(
                "l4router_backend_pool_requests_total", backend="pool", result="hit"
            )
    assert replies == [b"fresh:q%d" % i for i in range(20)]
    assert discarded >= 6
    assert hits >= 1  # spares were handed out, and never a closed one


NGINX_CONF = """
daemon off;
master_process off;
error_log {prefix}/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
    log_format pp '$proxy_protocol_addr $proxy_protocol_port';
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        access_log {prefix}/proxied.log pp;
        location / {{ return 200 "nginx saw $proxy_protocol_addr\\n"; }}
    }}
}}
"""


@pytest.fixture
def nginx_with_proxy_protocol(tmp_path):
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    with running_nginx(prefix, NGINX_CONF.format(prefix=prefix, port=port), (port,)):
        yield port, prefix / "proxied.log"


def test_proxy_protocol_v1_and_v2_are_accepted_by_nginx(tmp_path, nginx_with_proxy_protocol):
    nginx_port, proxied_log = nginx_with_proxy_protocol
    v4_port, v6_port = free_port(), free_port("::1")
    config = f"""
listeners:
  - name: v1
    listen: "127.0.0.1:{v4_port}"
    default: nginx_v1
  - name: v2
    listen: ["[::1]:{v6_port}"]
    default: nginx_v2
backends:
  nginx_v1: {{servers: ["127.0.0.1:{nginx_port}"], proxy_protocol: v1}}
  nginx_v2: {{servers: ["127.0.0.1:{nginx_port}"], proxy_protocol: v2}}
"""
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with Router(tmp_path, config):
        via_v1 = ask(v4_port, request, source="127.0.0.9")
        with socket.socket(socket.AF_INET6) as client:
            client.bind(("::1", 0))
            client_port = client.getsockname()[1]
            client.connect(("::1", v6_port))
            client.sendall(request)
            via_v2 = b""
            while chunk := client.recv(4096):
                via_v2 += chunk
    assert via_v1.endswith(b"nginx saw 127.0.0.9\n")
    assert via_v2.endswith(b"nginx saw ::1\n")
    logged = wait_until(
        lambda: (
            proxied_log.read_text().splitlines()
            if proxied_log.exists() and len(proxied_log.read_text().splitlines()) >= 2
            else None
        )
    )
    assert logged[0].startswith("127.0.0.9 ")
    assert logged[1] == f"::1 {client_port}"


def test_servers_by_host_name_and_the_backends_status_view(tmp_path):
    import json

    with Backend("named", reply_with_name) as named:
        port = free_port()
        config = f"""
listeners:
  - name: front
    listen: "127.0.0.1:{port}"
    default: by_name
backends:
  by_name:
    servers: ["localhost:{named.port}"]
    health_check: {{interval: 1s, timeout: 500ms}}
"""
        with Router(tmp_path, config) as router:
            assert (
                wait_until(lambda: _ask_or_none(port), message="the name to resolve") == b"named:x"
            )
            status = json.loads(router.get("/status/backends"))
    server = status[0]["servers"][0]
    assert status[0]["backend"] == "by_name"
    assert server["server"] == f"localhost:{named.port}"
    assert server["address"] in ("127.0.0.1", "::1")
    assert server["healthy"] is True and server["active_connections"] == 0


def _ask_or_none(port):
    try:
        return ask(port, b"x") or None
    except OSError:
        return None


def test_proxy_v2_tlvs_reach_haproxy_as_authority_and_unique_id(tmp_path):
    """HAProxy, the real receiving peer, reads what our v2 header carries (its
    fc_pp_authority and fc_pp_unique_id, in its own log)."""
    from tests.test_security import client_hello, tls_record

    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert os.path.exists(haproxy), "haproxy missing: apt-get install haproxy"
    with Backend("app", reply_with_name) as app:
        router_port, haproxy_port = free_port(), free_port()
        (tmp_path / "haproxy.cfg").write_text(f"""
global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    log-format "pp authority=%[fc_pp_authority] unique_id=%[fc_pp_unique_id]"
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{haproxy_port} accept-proxy
    default_backend app
backend app
    server app 127.0.0.1:{app.port}
""")
        log = open(tmp_path / "haproxy.log", "wb")
        peer = subprocess.Popen(
            [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: listening(haproxy_port), message="haproxy listening")
            config = f"""
listeners:
  - name: edge
    listen: "127.0.0.1:{router_port}"
    default: haproxy
backends:
  haproxy:
    servers: ["127.0.0.1:{haproxy_port}"]
    proxy_protocol: {{version: v2, tlvs: [authority, alpn, unique_id]}}
"""
            flight = tls_record(client_hello(600))
            with Router(tmp_path, config) as router:
                with socket.create_connection(("127.0.0.1", router_port), timeout=10) as client:
                    client.sendall(flight)
                    client.shutdown(socket.SHUT_WR)
                    assert client.recv(100).startswith(b"app:")
                event = router.wait_access_events(1)[0]
            assert event["fields"]["sni"] == "router.example"
            wait_until(
                lambda: b"pp authority=" in (tmp_path / "haproxy.log").read_bytes(),
                message="haproxy's log line",
            )
            line = [
                row
                for row in (tmp_path / "haproxy.log").read_bytes().splitlines()
                if row.startswith(b"pp ")
            ][0].decode()
            assert line == f"pp authority=router.example unique_id={event['unique_id']}"
        finally:
            peer.terminate()
            peer.wait(10)
            log.close()


def test_backup_servers_serve_only_while_no_primary_is_up(tmp_path):
    primary_port = free_port()  # nothing there yet: the primary is down
    with Backend("backup", reply_with_name) as backup:
        port = free_port()
        config = f"""
listeners:
  - name: edge
    listen: "127.0.0.1:{port}"
    default: web
backends:
  web:
    servers: ["127.0.0.1:{primary_port}", {{address: "127.0.0.1:{backup.port}", backup: true}}]
    health_check: {{interval: 100ms, timeout: 200ms, rise: 1, fall: 1}}
"""
        with Router(tmp_path, config) as router:
            wait_until(
                lambda: router.metric("l4router_backend_backup_serving", backend="web") == 1,
                message="the backup serving",
            )
            assert {ask(port, b"one") for _ in range(5)} == {b"backup:one"}
            page = router.get("/").decode()
            assert "web (backup tier serving)" in page and "(backup)" in page
            with Backend("primary", reply_with_name, port=primary_port):
                wait_until(
                    lambda: router.metric("l4router_backend_backup_serving", backend="web") == 0,
                    message="the primary up",
                )
                assert {ask(port, b"two") for _ in range(5)} == {b"primary:two"}
            status = json.loads(router.get("/status/backends"))
            assert [s["backup"] for s in status[0]["servers"]] == [False, True]


def test_a_route_falls_back_while_its_backend_has_no_server_up(tmp_path):
    dead = free_port()
    with Backend("spare", reply_with_name) as spare:
        port = free_port()
        config = f"""
listeners:
  - name: edge
    listen: "127.0.0.1:{port}"
    routes:
      - name: web
        match: {{protocol: http1}}
        backend: main
        fallback: spare
    default: reject
backends:
  main:
    servers: ["127.0.0.1:{dead}"]
    health_check: {{interval: 100ms, timeout: 200ms, rise: 1, fall: 1}}
  spare: {{servers: ["127.0.0.1:{spare.port}"]}}
"""
        with Router(tmp_path, config) as router:
            wait_until(
                lambda: (
                    router.metric(
                        "l4router_backend_server_up", backend="main", server=f"127.0.0.1:{dead}"
                    )
                    == 0
                ),
                message="main's server down",
            )
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            assert ask(port, request) == b"spare:GET / HTTP/1.1"
            event = router.wait_access_events(1)[0]
            assert (event["route"], event["backend"]) == ("web", "spare")
            assert (
                router.metric(
                    "l4router_connections_fallback_total",
                    listener="edge",
                    route="web",
                    backend="spare",
                )
                == 1
            )


TLVS_ASKED = "authority,unique-id,ssl,crc32c"  # HAProxy sends the ALPN unasked


def test_proxy_v2_tlvs_from_haproxy_become_route_fields(tmp_path):
    """HAProxy, the real sending peer, terminates TLS and puts the SNI, the ALPN, its unique
    id and the SSL TLV in its v2 header: l4router routes on pp_authority and logs them all."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert os.path.exists(haproxy), "haproxy missing: apt-get install haproxy"
    ca = trustme.CA()
    certificate = ca.issue_cert("one.test", "two.test")
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(certificate.private_key_and_cert_chain_pem.bytes())
    with Backend("one", http_reply_with_name) as one, Backend("two", http_reply_with_name) as two:
        router_port, haproxy_port = free_port(), free_port()
        (tmp_path / "haproxy.cfg").write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{haproxy_port} ssl crt {pem} alpn http/1.1
    unique-id-format hap-%{{+X}}o%ci%cp
    default_backend router
backend router
    server l4router 127.0.0.1:{router_port} send-proxy-v2 proxy-v2-options {TLVS_ASKED}
""")
        peer = subprocess.Popen(
            [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: listening(haproxy_port), message="haproxy listening")
            config = f"""
listeners:
  - name: behind_haproxy
    listen: "127.0.0.1:{router_port}"
    accept_proxy_protocol: {{from: [127.0.0.1/32]}}
    routes:
      - {{match: {{protocol: http1, pp_authority: one.test, pp_ssl: true}}, backend: one}}
      - {{match: {{pp_authority: two.test}}, backend: two}}
    default: reject
backends:
  one: {{servers: ["127.0.0.1:{one.port}"]}}
  two: {{servers: ["127.0.0.1:{two.port}"]}}
"""
            with Router(tmp_path, config) as router:
                context = ssl.create_default_context()
                ca.configure_trust(context)
                context.set_alpn_protocols(["http/1.1"])
                for name in ("one.test", "two.test"):
                    with (
                        socket.create_connection(("127.0.0.1", haproxy_port), timeout=10) as raw,
                        context.wrap_socket(raw, server_hostname=name) as tls,
                    ):
                        tls.sendall(b"GET /x HTTP/1.1\r\nHost: any\r\n\r\n")
                        assert read_all(tls).endswith(f"{name.split('.')[0]} /x".encode())
                events = router.wait_access_events(2)
        finally:
            peer.terminate()
            peer.wait(10)
    fields = [e["fields"] for e in events]
    assert [f["pp_authority"] for f in fields] == ["one.test", "two.test"]
    assert all(f["pp_alpn"] == "http/1.1" and f["pp_ssl"] is True for f in fields)
    assert all(f["pp_unique_id"].startswith("hap-") for f in fields)
    assert fields[0]["pp_ssl_version"].startswith("TLSv1.")
    assert [e["backend"] for e in events] == ["one", "two"]
    assert all(e["source"] == "127.0.0.1" for e in events)


def read_all(tls):
    data = b""
    while chunk := tls.recv(4096):
        data += chunk
    return data
