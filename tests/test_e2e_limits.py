"""Limits mean the same with one process or several workers: exactly N, never N+1, never a
refusal below N (the real supervisor and workers, clients from many loopback addresses)."""

import json
import os
import signal
import socket

import pytest

from l4router.process.steering import source_hash_program
from tests.dns_peer import DNSServer
from tests.support import Backend, Router, free_port, wait_until
from tests.test_e2e_udp import dns_config, queries_answered
from tests.test_e2e_workers import worker_pids

pytestmark = pytest.mark.timeout(180)


class HeldBackend(Backend):
    """Answers `ok` to every connection and keeps it open until the client's end reaches it."""

    def __init__(self):
        def hold(backend, connection):
            connection.recv(100)
            connection.sendall(b"ok")
            while connection.recv(100):
                pass

        super().__init__("held", hold)


def limits_config(port, backend, listener_limits):
    return f"""
listeners:
  - name: front
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 200ms}}
    {listener_limits}
    default: held
backends:
  held: {{servers: ["127.0.0.1:{backend.port}"]}}
"""


def open_clients(port, sources, payload=b"hello"):
    """One connection from each source address, sending `payload` and held open;
    (client, relayed?) for each."""
    clients = []
    for source in sources:
        client = socket.socket()
        client.settimeout(10)
        client.bind((source, 0))
        client.connect(("127.0.0.1", port))
        client.sendall(payload)
        clients.append(client)
    results = []
    for client in clients:
        try:
            results.append((client, client.recv(10) == b"ok"))
        except OSError:
            results.append((client, False))
    return results


def close_all(results):
    for client, _ in results:
        client.close()


def workers_used(router):
    """How many workers hold a connection now (the status merges theirs)."""
    return {row["worker"] for row in json.loads(router.get("/status/connections"))}


@pytest.mark.parametrize("workers", [2, 3])
def test_max_connections_admits_exactly_its_value_over_all_workers(tmp_path, workers):
    with HeldBackend() as backend:
        port = free_port()
        # A per-source limit that never binds has connections steered by source, so the four
        # first sources land on more than one worker every time (unsteered, the kernel's hash
        # of the address pair may put all four on one).
        limits = "max_connections: 5\n    max_connections_per_source: 100"
        config = limits_config(port, backend, limits)
        with Router(tmp_path, config, workers=workers) as router:
            for attempt in range(3):  # every time, not once
                # Four first (they land on more than one worker), then sixteen more.
                first = open_clients(port, [f"127.0.0.{i}" for i in range(1, 5)])
                rest = []
                try:
                    assert all(relayed for _, relayed in first), attempt
                    used = workers_used(router)
                    assert len(used) > 1, used
                    rest = open_clients(port, [f"127.0.0.{i}" for i in range(5, 21)])
                    assert sum(relayed for _, relayed in rest) == 1, attempt
                finally:
                    close_all(first + rest)
                wait_until(
                    lambda: router.metric("l4router_connections_active", listener="front") == 0,
                    message="every connection closed",
                )
            assert (
                router.metric(
                    "l4router_connections_rejected_total", listener="front", reason="limit_listener"
                )
                == 45
            )


@pytest.mark.parametrize("workers", [2, 3])
def test_per_source_limit_admits_exactly_its_value_from_each_source(tmp_path, workers):
    with HeldBackend() as backend:
        port = free_port()
        config = limits_config(port, backend, "max_connections_per_source: 2")
        with Router(tmp_path, config, workers=workers) as router:
            results = open_clients(port, ["127.0.0.1"] * 6 + ["127.0.0.2"] * 6)
            try:
                first, second = results[:6], results[6:]
                assert sum(relayed for _, relayed in first) == 2
                assert sum(relayed for _, relayed in second) == 2
                assert (
                    router.metric(
                        "l4router_connections_rejected_total",
                        listener="front",
                        reason="limit_source",
                    )
                    == 8
                )
            finally:
                close_all(results)


def test_a_killed_worker_gives_back_what_it_held(tmp_path):
    with HeldBackend() as backend:
        port = free_port()
        config = limits_config(port, backend, "max_connections: 4")
        with Router(tmp_path, config, workers=2) as router:
            results = open_clients(port, [f"127.0.0.{i}" for i in range(1, 21)])
            assert sum(relayed for _, relayed in results) == 4
            pids = worker_pids(router)
            os.kill(pids[0], signal.SIGKILL)  # with whatever it held
            wait_until(
                lambda: set(worker_pids(router).values()) != set(pids.values()),
                timeout=20,
                message="the worker restarted",
            )
            wait_until(
                lambda: router.metric("l4router_workers_ready") == 2,
                timeout=20,
                message="both workers ready",
            )
            close_all(results)
            wait_until(
                lambda: router.metric("l4router_connections_active", listener="front") == 0,
                message="every connection closed",
            )
            again = open_clients(port, [f"127.0.1.{i}" for i in range(1, 21)])
            try:
                assert sum(relayed for _, relayed in again) == 4
            finally:
                close_all(again)


def test_udp_session_limits_are_exact_over_workers(tmp_path):
    with DNSServer("10.0.0.1") as alpha, DNSServer("10.0.0.2") as beta:
        port = free_port()
        config = dns_config(port, alpha, beta, extra="max_sessions: 3")
        with Router(tmp_path, config, workers=2) as router:
            answered = queries_answered(port, [f"127.0.0.{i}" for i in range(1, 11)])
            assert answered == 3
            assert (
                router.metric(
                    "l4router_udp_datagrams_dropped_total", listener="dns", reason="limit_listener"
                )
                == 7
            )


def test_the_steering_program_hashes_the_configured_ipv6_prefix():
    program = source_hash_program(3, 48)
    loads = [k for code, _, _, k in program if code == 0x20]
    masks = [k for code, _, _, k in program if code == 0x54]
    assert len(loads) == 3  # IPv4's source word, and IPv6's first two words
    assert masks == [0xFFFFFFFF, 0xFFFF0000]
    assert program[-2] == (0x94, 0, 0, 3) and program[-1][0] == 0x16


def test_a_token_bucket_bounds_new_connections_per_source():
    from l4router.connection.limits import Admission, LocalLimit, TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # another source has its own bucket
    now[0] = 0.5  # one token back
    assert buckets.take("a") and not buckets.take("a")
    from l4router.config import RateLimit

    admission = Admission(LocalLimit(), rate=RateLimit(1.0, 1), clock=lambda: now[0])
    assert admission.admit("2001:db8::1") is None
    assert admission.admit("2001:db8::2") == "rate_source"  # the same /64
    assert admission.active == 1  # a refusal holds nothing


@pytest.mark.parametrize("workers", [1, 2])
def test_new_connections_per_source_are_rate_limited_exactly(tmp_path, workers):
    with HeldBackend() as backend:
        port = free_port()
        config = limits_config(port, backend, "rate_per_source: {rate: 0.5, burst: 3}")
        with Router(tmp_path, config, workers=workers) as router:
            results = open_clients(port, ["127.0.0.1"] * 5 + ["127.0.0.2"] * 5)
            try:
                assert [relayed for _, relayed in results] == [True] * 3 + [False] * 2 + [
                    True
                ] * 3 + [False] * 2
                assert (
                    router.metric(
                        "l4router_connections_rejected_total",
                        listener="front",
                        reason="rate_source",
                    )
                    == 4
                )
            finally:
                close_all(results)


def http_clients(port, host, sources):
    """`open_clients` with an HTTP/1 request for `host` (routes and names see it)."""
    return open_clients(port, sources, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())


@pytest.mark.parametrize("workers", [1, 2])
def test_route_and_backend_limits_admit_exactly_their_maximum(tmp_path, workers):
    with HeldBackend() as backend:
        port = free_port()
        config = f"""
listeners:
  - name: front
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 200ms}}
    routes:
      - {{name: capped_route, match: {{host: r.test}}, backend: held, max_connections: 3}}
      - {{name: other, match: {{host: b.test}}, backend: capped}}
    default: reject
backends:
  held: {{servers: ["127.0.0.1:{backend.port}"]}}
  capped: {{servers: ["127.0.0.1:{backend.port}"], max_connections: 4}}
"""
        with Router(tmp_path, config, workers=workers) as router:
            sources = [f"127.0.0.{i}" for i in range(10, 30)]
            routed = http_clients(port, "r.test", sources[:10])
            capped = http_clients(port, "b.test", sources[10:])
            admitted = (sum(ok for _, ok in routed), sum(ok for _, ok in capped))

            def refused(reason):
                return router.metric(
                    "l4router_connections_rejected_total", listener="front", reason=reason
                )

            wait_until(
                lambda: (refused("limit_route"), refused("limit_backend")) == (7, 6),
                message="the refusals counted",
            )
            close_all(routed + capped)
            # Given back: as many are admitted again.
            wait_until(
                lambda: router.metric("l4router_connections_active", listener="front") == 0,
                message="every connection ended",
            )
            again = http_clients(port, "r.test", sources[:3])
            assert all(ok for _, ok in again)
            close_all(again)
    assert admitted == (3, 4)
    logged = [
        e
        for e in router.events()
        if e.get("reason") in ("limit_route", "limit_backend")
        and "refused" in e.get("log_format", "")
    ]
    assert logged  # one rate-limited line per reason, not one per connection
    assert len(logged) <= 2 * workers


def test_a_name_limit_counts_each_sni_or_host_apart(tmp_path):
    with HeldBackend() as backend:
        port = free_port()
        config = limits_config(port, backend, "max_connections_per_name: 2")
        with Router(tmp_path, config) as router:
            results = http_clients(port, "a.test", ["127.0.0.2"] * 4) + http_clients(
                port, "b.test", ["127.0.0.3"] * 3
            )
            admitted = [ok for _, ok in results]
            wait_until(
                lambda: (
                    router.metric(
                        "l4router_connections_rejected_total", listener="front", reason="limit_name"
                    )
                    == 3
                ),
                message="the refusals counted",
            )
            close_all(results)
    assert (sum(admitted[:4]), sum(admitted[4:])) == (2, 2)  # which ones: the order they came
