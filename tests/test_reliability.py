"""Reliability and security through the real router process: integrity under concurrency and
signals, backend and client faults, churn, hostile first flights, fuzzing, steering, log
injection. Every case records its figures in tests/artifacts/reliability/; `python
bench/reliability_table.py` turns them into docs/RELIABILITY.md.

RELIABILITY_SCALE=1 (the default, in CI) runs a fast version of each case; the long run is
RELIABILITY_SCALE=10 (200 relays of up to 32 MiB, 50,000 churn connections, longer fuzzing).
"""

import hashlib
import json
import os
import pathlib
import random
import signal
import socket
import struct
import threading
import time

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.captures import capture, capture_names
from tests.support import (
    Backend,
    Router,
    free_port,
    pseudo_random_stream,
    read_to_end,
    reply_with_name,
    started_daemon,
    stream_digest,
    wait_until,
)

SCALE = int(os.environ.get("RELIABILITY_SCALE", "1"))
RESULTS = pathlib.Path(__file__).parent / "artifacts" / "reliability"
pytestmark = pytest.mark.timeout(600 * SCALE)


def record(case, **figures):
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures["scale"] = SCALE
    (RESULTS / f"{case}.json").write_text(json.dumps(figures, indent=2, default=str))


def process_figures(router):
    return {
        "fds": router.metric("process_open_fds"),
        "rss_mib": round(router.metric("process_resident_memory_bytes") / 2**20, 1),
        "timers": router.metric("l4router_reactor_delayed_calls"),
    }


def single_backend(port, backend_port, extra="", idle_timeout="3s"):
    return f"""
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 1s}}
    idle_timeout: {idle_timeout}
    {extra}
    default: sink
backends:
  sink: {{servers: ["127.0.0.1:{backend_port}"]}}
shutdown_timeout: {60 * SCALE}s
"""


# Integrity under concurrency and signals


def duplex_backend(backend, connection):
    """Reads `seed up down half`, then sends `down` bytes while reading `up` bytes."""
    header = b""
    while not header.endswith(b"\n"):
        header += connection.recv(1)
    seed, up, down, half = (int(x) for x in header.split())
    sender = started_daemon(_send_chunked, connection, seed + 1, down, seed)
    digest, count = hashlib.sha256(), 0
    while count < up:
        chunk = connection.recv(min(1 << 20, up - count))
        if not chunk:
            break
        digest.update(chunk)
        count += len(chunk)
    sender.join()
    backend.record((seed, digest.hexdigest(), count))
    connection.shutdown(socket.SHUT_WR)
    if half:
        connection.recv(1)  # the client's FIN


def _send_chunked(connection, seed, size, pause_seed):
    """Random chunk sizes with random short pauses: the relay sees every kind of write."""
    pacing = random.Random(pause_seed)
    for block in pseudo_random_stream(seed, size, chunk=64 * 1024):
        view = memoryview(block)
        while view:
            cut = pacing.randint(1, len(view))
            connection.sendall(view[:cut])
            view = view[cut:]
            if pacing.random() < 0.02:
                time.sleep(pacing.random() / 100)


def duplex_client(port, seed, up, down, half, results):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            client.sendall(b"%d %d %d %d\n" % (seed, up, down, int(half)))
            received = {}
            reader = started_daemon(lambda: received.update(down=read_to_end(client)))
            _send_chunked(client, seed, up, seed + 7)
            if half:
                client.shutdown(socket.SHUT_WR)
            reader.join(300)
            results[seed] = received.get("down")
    except OSError as exc:
        results[seed] = exc


def test_integrity_of_concurrent_duplex_relays_through_reloads_and_a_drain(tmp_path):
    relays = 50 if SCALE == 1 else 200
    largest = (4 if SCALE == 1 else 32) * 1024 * 1024
    plan = random.Random(11)
    sizes = {
        seed: (plan.randint(0, largest), plan.randint(0, largest), seed % 2 == 0)
        for seed in range(1000, 1000 + relays * 10, 10)
    }
    with Backend("duplex", duplex_backend) as backend:
        port = free_port()
        # At scale 10 this process runs some 800 threads (clients, backend handlers, senders):
        # one can wait seconds for the GIL, and a backend that has not read for 3 s is rightly
        # closed as idle. The idle timeout grows with the scale; what is tested is integrity.
        config = single_backend(port, backend.port, idle_timeout=f"{3 * SCALE}s")
        with Router(tmp_path, config) as router:
            results = {}
            started = time.monotonic()
            threads = [
                started_daemon(duplex_client, port, seed, up, down, half, results)
                for seed, (up, down, half) in sizes.items()
            ]
            wait_until(
                lambda: (
                    router.metric("l4router_connections_accepted_total", listener="main") == relays
                ),
                timeout=60 * SCALE,
                message="every relay accepted",
            )
            for _ in range(2):  # reloads while the relays run
                router.process.send_signal(signal.SIGHUP)
                time.sleep(0.3)
            router.process.send_signal(signal.SIGTERM)  # and a drain: every relay must finish
            for thread in threads:
                thread.join(600)
            code = router.process.wait(120)
            elapsed = time.monotonic() - started
    assert code == 0
    by_seed = {seed: (digest, count) for seed, digest, count in backend.results}
    total = 0
    for seed, (up, down, half) in sizes.items():
        assert results[seed] == (stream_digest(seed + 1, down), down), seed
        assert by_seed[seed] == (stream_digest(seed, up), up), seed
        total += up + down
    record(
        "integrity",
        relays=relays,
        largest_mib=largest // 2**20,
        bytes=total,
        seconds=round(elapsed, 1),
        half_closed=relays // 2,
        signals="2 SIGHUP + SIGTERM drain",
        result="every stream byte-exact (sha256)",
    )


# Backend faults


def resets_mid_stream(backend, connection):
    connection.recv(100)
    connection.sendall(b"x" * 100_000)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def never_reads(backend, connection):
    time.sleep(8)


def closes_at_once(backend, connection):
    pass


def one_byte_per_second(backend, connection):
    connection.recv(100)
    for _ in range(3):
        connection.sendall(b".")
        time.sleep(1)


def test_backend_faults_end_their_relay_cleanly_and_disturb_no_other(tmp_path):
    faults = {
        "reset": resets_mid_stream,
        "never_reads": never_reads,
        "closes": closes_at_once,
        "slow": one_byte_per_second,
    }
    backends = {name: Backend(name, handler).__enter__() for name, handler in faults.items()}
    healthy = Backend("healthy", duplex_backend).__enter__()
    try:
        port = free_port()
        routes = "\n".join(
            f'      - match: {{protocol: http1, path: "/{name}"}}\n        backend: {name}'
            for name in faults
        )
        servers = "\n".join(
            f'  {name}: {{servers: ["127.0.0.1:{b.port}"]}}' for name, b in backends.items()
        )
        config = f"""
listeners:
  - name: faults
    listen: "127.0.0.1:{port}"
    idle_timeout: 2s
    routes:
{routes}
    default: healthy
backends:
{servers}
  healthy: {{servers: ["127.0.0.1:{healthy.port}"]}}
"""
        with Router(tmp_path, config) as router:
            results = {}
            good = started_daemon(duplex_client, port, 5000, 8 << 20, 8 << 20, True, results)
            outcomes = {}

            def fault_client(name):
                with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                    client.sendall(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
                    if name == "never_reads":
                        client.settimeout(0.5)
                        try:
                            while True:
                                client.sendall(b"y" * 65536)
                        except (socket.timeout, OSError):
                            pass
                        client.settimeout(20)
                    try:
                        outcomes[name] = len(read_to_end(client)[0])
                    except OSError as exc:
                        outcomes[name] = type(exc).__name__

            clients = [
                threading.Thread(daemon=True, target=fault_client, args=(n,)) for n in faults
            ]
            for client in clients:
                client.start()
            for client in clients + [good]:
                client.join(60)
            events = router.wait_access_events(5)
            reasons = {e["fields"].get("path", "/healthy").strip("/"): e["reason"] for e in events}
            traceback = "Traceback" in router.log_text()
    finally:
        for backend in (*backends.values(), healthy):
            backend.__exit__(None, None, None)
    assert results[5000] == (stream_digest(5001, 8 << 20), 8 << 20)
    assert reasons["reset"] == "backend_reset"
    assert reasons["never_reads"] == "idle_timeout"
    # A FIN from the server is passed on; once the client has closed too the relay is
    # complete (TCP cannot tell a full close from a half-close).
    assert reasons["closes"] in ("completed", "backend_closed")
    assert reasons["slow"] in ("completed", "backend_closed")
    assert not traceback
    record(
        "backend_faults",
        cases=reasons,
        healthy_relay="16 MiB byte-exact meanwhile",
        result="each ends with its reason; no other relay disturbed",
    )


# Client faults


def test_client_faults_leave_memory_bounded_and_a_good_client_served(tmp_path):
    idle_count = 1000 * min(SCALE, 5)
    with (
        Backend("echo", reply_with_name) as echo,
        Backend("flood", lambda b, c: _flood(c)) as flood,
    ):
        port = free_port()
        config = f"""
listeners:
  - name: clients
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 1s}}
    routes:
      - match: {{protocol: http1, path: "/flood"}}
        backend: flood
      - match: {{protocol: http1}}
        backend: echo
    on_timeout: reject
    default: reject
backends:
  echo: {{servers: ["127.0.0.1:{echo.port}"]}}
  flood: {{servers: ["127.0.0.1:{flood.port}"]}}
"""
        with Router(tmp_path, config) as router:
            before = process_figures(router)
            latencies = []
            stop = threading.Event()

            def good_client():
                while not stop.is_set():
                    started = time.monotonic()
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                        c.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                        assert c.recv(100).startswith(b"echo:")
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.01)

            prober = threading.Thread(daemon=True, target=good_client)
            prober.start()
            # Slowloris: one byte every 500 ms; ended at detect.timeout.
            slow_started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
                try:
                    for byte in b"GET / HTTP/1.1\r\n":
                        slow.sendall(bytes([byte]))
                        time.sleep(0.5)
                except OSError:
                    pass
                slow.settimeout(5)
                try:
                    slow.recv(10)
                except OSError:
                    pass
            slowloris_seconds = time.monotonic() - slow_started
            # Connections that open and send nothing, and connections reset at once.
            silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle_count)]
            for _ in range(idle_count):
                reset = socket.create_connection(("127.0.0.1", port))
                reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                reset.close()
            # A client that never reads while its backend floods it.
            stuck = socket.create_connection(("127.0.0.1", port))
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            stuck.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(3)
            during = process_figures(router)
            for sock in silent:
                sock.close()
            stuck.close()
            stop.set()
            prober.join(30)
            wait_until(
                lambda: router.metric("l4router_connections_active", listener="clients") == 0,
                timeout=20,
                message="every connection to end",
            )
            after = process_figures(router)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert 0.9 < slowloris_seconds < 3
    assert during["rss_mib"] - before["rss_mib"] < 64
    assert after["fds"] <= before["fds"] + 2
    assert p99 < 0.5, p99
    record(
        "client_faults",
        silent_connections=idle_count,
        reset_connections=idle_count,
        slowloris_ended_after_s=round(slowloris_seconds, 2),
        before=before,
        during=during,
        after=after,
        good_client_requests=len(latencies),
        good_client_p50_ms=round(latencies[len(latencies) // 2] * 1000, 1),
        good_client_p99_ms=round(p99 * 1000, 1),
        result="memory bounded, fds back, the good client served",
    )


def _flood(connection):
    connection.recv(100)
    try:
        for block in pseudo_random_stream(9, 256 << 20):
            connection.sendall(block)
    except OSError:
        pass


# Churn


def test_churn_leaves_no_fd_timer_or_memory_behind(tmp_path):
    count = 5000 * SCALE
    with Backend("echo", reply_with_name) as echo:
        port = free_port()
        with Router(tmp_path, single_backend(port, echo.port)) as router:
            for _ in range(200):  # warm up allocators and caches
                _one_request(port)
            before = process_figures(router)
            started = time.monotonic()
            errors = 0
            done = [0]

            def worker(n):
                nonlocal errors
                for _ in range(n):
                    try:
                        _one_request(port)
                        done[0] += 1
                    except OSError:
                        errors += 1

            workers = [
                threading.Thread(daemon=True, target=worker, args=(count // 8,)) for _ in range(8)
            ]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join(600)
            elapsed = time.monotonic() - started
            wait_until(
                lambda: router.metric("l4router_connections_active", listener="main") == 0,
                message="all connections to end",
            )
            time.sleep(0.5)
            after = process_figures(router)
    assert errors == 0
    assert after["fds"] <= before["fds"] + 2
    assert after["timers"] <= before["timers"] + 2
    assert after["rss_mib"] - before["rss_mib"] < 16
    record(
        "churn",
        connections=done[0],
        seconds=round(elapsed, 1),
        per_second=round(done[0] / elapsed),
        before=before,
        after=after,
        result="fds, timers and RSS back within bounds",
    )


def _one_request(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(100).startswith(b"echo:")


# Hostile first flights


def _tls_record(handshake):
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def _client_hello(extensions):
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _hostile_flights():
    huge_sni = b"a" * 65000
    sni_ext = (
        b"\x00\x00"
        + (len(huge_sni) + 5).to_bytes(2, "big")
        + (len(huge_sni) + 3).to_bytes(2, "big")
        + b"\x00"
        + len(huge_sni).to_bytes(2, "big")
        + huge_sni
    )
    alpn = b"".join(bytes([3]) + b"h%02d" % (i % 100) for i in range(4000))
    alpn_ext = (
        b"\x00\x10" + (len(alpn) + 2).to_bytes(2, "big") + len(alpn).to_bytes(2, "big") + alpn
    )
    padding_ext = b"\x00\x15" + (65535 - 4).to_bytes(2, "big") + bytes(65531)
    encoder = hpack.Encoder()
    bomb_block = encoder.encode([(b"x-bomb", b"A" * 4000)]) + b"\xbe" * 4000  # indexed repeats

    def frame(kind, flags, stream, payload):
        return (
            len(payload).to_bytes(3, "big")
            + bytes([kind, flags])
            + stream.to_bytes(4, "big")
            + payload
        )

    hpack_bomb = (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(4, 0, 0, b"")
        + frame(1, 4, 1, bomb_block[:16000])
    )
    nested = b'{"jsonrpc": "2.0", "method": ' + b"[" * 50000 + b"\n"
    dns_loop = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
    quic_absurd = b"\xc3\x00\x00\x00\x01\x08" + bytes(8) + b"\x00\x00\x7f\xff\xff\xff" + bytes(64)
    return {
        "tls_record_length_overflow": b"\x16\x03\x01\xff\xff" + bytes(100),
        "tls_handshake_length_overflow": _tls_record(b"\x01\xff\xff\xff" + bytes(200)),
        "tls_64k_of_extensions": _tls_record(_client_hello(padding_ext)[:16000]),
        "tls_4000_alpn_entries": b"".join(_tls_record(c) for c in [_client_hello(alpn_ext)]),
        "tls_sni_of_65000_bytes": _tls_record(_client_hello(sni_ext)[:16000]),
        "http_header_line_of_1_mib": b"GET / HTTP/1.1\r\nX-Long: " + b"a" * (1 << 20),
        "hpack_bomb": hpack_bomb,
        "deeply_nested_json": nested,
        "dns_compression_loop_over_tcp": dns_loop,
        "quic_absurd_lengths_over_tcp": quic_absurd,
    }


def test_hostile_first_flights_are_unknown_or_rejected_within_bounds(tmp_path):
    flights = _hostile_flights()
    with Backend("sink", lambda b, c: b.record(read_to_end(c))) as sink:
        port = free_port()
        config = single_backend(port, sink.port).replace(
            "detect: {timeout: 1s}", "detect: {timeout: 1s, max_bytes: 16384}"
        )
        with Router(tmp_path, config) as router:
            before = process_figures(router)
            for flight in flights.values():
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    try:
                        client.sendall(flight)
                        client.shutdown(socket.SHUT_WR)
                        read_to_end(client)
                    except OSError:
                        pass
            events = router.wait_access_events(len(flights), timeout=20)
            after = process_figures(router)
            log = router.log_text()
    protocols = [e["protocol"] for e in events]
    # 4,000 ALPN offers still fit in max_bytes and make a valid ClientHello: that one is TLS,
    # with its fields bounded. The two ClientHellos cut at 16,000 bytes are TLS all the same
    # (truncated: true, no SNI: it was in the part cut off); every other flight is unknown.
    tls = [e for e in events if e["protocol"] == "tls"]
    assert len(tls) <= 3 and set(protocols) <= {"unknown", "tls"}, protocols
    assert sum(bool(e["fields"].get("truncated")) for e in tls) == 2, tls
    for event in tls:
        assert len(event["fields"]["alpn"]) <= 64 and "sni" not in event["fields"]
    assert "Traceback" not in log
    assert after["rss_mib"] - before["rss_mib"] < 32
    record(
        "hostile_flights",
        flights=list(flights),
        decided_as=dict(zip(flights, protocols)),
        max_bytes=16384,
        rss_before_mib=before["rss_mib"],
        rss_after_mib=after["rss_mib"],
        result="all unknown within max_bytes; no traceback",
    )


# Fuzzing (hypothesis, seeded from tests/data; FUZZ_EXAMPLES for a long run)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", str(2000 * SCALE)))


def _parsers():
    from tests.test_parsers_fuzz import PARSERS

    return PARSERS


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_fuzz_each_parser_seeded_from_captures(name):
    parser = _parsers()[name]
    seeds = [capture(n) for n in capture_names()]
    executions = []

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        seed=st.sampled_from(seeds),
        edits=st.lists(
            st.tuples(st.integers(min_value=0), st.binary(min_size=0, max_size=8)), max_size=6
        ),
        cut=st.integers(min_value=0),
    )
    def run(seed, edits, cut):
        data = bytearray(seed)
        for position, patch in edits:
            position %= max(len(data), 1)
            data[position : position + len(patch)] = patch
        executions.append(1)
        parser(bytes(data[: cut % (len(data) + 1)]) if cut % 3 == 0 else bytes(data))

    started = time.monotonic()
    run()
    record(
        f"fuzz_{name}",
        executions=len(executions),
        seconds=round(time.monotonic() - started, 2),
        corpus=len(seeds),
        result="no input raised",
    )


# Security


def test_no_client_field_steers_the_router_to_an_address_the_config_does_not_name(tmp_path):
    with (
        Backend("configured", reply_with_name) as configured,
        Backend("elsewhere", reply_with_name) as elsewhere,
    ):
        port = free_port()
        config = f"""
listeners:
  - name: edge
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: http1, host: "*"}}
        backend: configured
    default: configured
backends:
  configured: {{servers: ["127.0.0.1:{configured.port}"]}}
"""
        target = f"127.0.0.1:{elsewhere.port}".encode()
        attempts = [
            b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target),
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target),
            b"PROXY TCP4 127.0.0.1 127.0.0.1 1 %d\r\nGET / HTTP/1.1\r\n\r\n" % elsewhere.port,
        ]
        with Router(tmp_path, config):
            for attempt in attempts:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    client.sendall(attempt)
                    assert client.recv(100).startswith(b"configured:")
    assert elsewhere.connections == 0
    record(
        "steering",
        attempts=["absolute-form Host", "CONNECT", "PROXY header"],
        result="only configured backends were connected",
    )


def test_log_injection_is_escaped_and_bounded(tmp_path):
    with Backend("sink", reply_with_name) as sink:
        port = free_port()
        with Router(tmp_path, single_backend(port, sink.port)) as router:
            evil_host = b"evil\r\nX-Forged: 1\x1b[31m" + b"x" * 5000
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"GET / HTTP/1.1\r\nUser-Agent: a\x1b[2Jb\nHost: x\r\n\r\n")
                client.recv(100)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: " + evil_host + b"\r\n\r\n")
                client.recv(100)
            events = router.wait_access_events(2)
            raw = router.log_path.read_bytes()
    assert b"\x1b" not in raw
    for event in events:
        for value in event["fields"].values():
            assert isinstance(value, (int, bool)) or (
                "\n" not in str(value) and len(str(value)) <= 1024
            )
    record(
        "log_injection",
        result="control characters escaped, fields at most 1,024 chars",
        log_bytes=len(raw),
    )


def test_admin_reload_needs_the_token_when_one_is_set(tmp_path):
    with Backend("sink", reply_with_name) as sink:
        port = free_port()
        with Router(tmp_path, single_backend(port, sink.port)) as router:
            assert router.post("/reload", token=None)[0] == 403
            assert router.post("/reload", token="wrong-token-value-here")[0] == 403
            assert router.post("/reload")[0] == 200
    record("admin_reload_auth", result="403 without or with a wrong token, 200 with it")
