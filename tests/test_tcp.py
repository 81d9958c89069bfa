"""The inbound protocol and the relay, driven with StringTransport and MemoryReactorClock."""

import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, UserError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass

from l4router.backends.group import BackendGroup
from l4router.config import parse_config
from l4router.connection.limits import Admission, LocalLimit
from l4router.connection.relay import IRelay, Relay
from l4router.connection.splice import SpliceRelay
from l4router.connection.tcp_listener import ListenerFactory
from l4router.detection.decision import DetectorSet
from l4router.detection.registry import detectors_for, installed_detectors
from l4router.operate.metrics import RouterMetrics
from l4router.parsers import proxyprotocol
from tests.memory_tcp import RecordedConnect, TCPTransport

CONFIG = """
listeners:
  - name: edge
    listen: "127.0.0.1:8000"
    detect: {timeout: 2s, max_bytes: 64}
    idle_timeout: 40s
    max_connections: 2
    routes:
      - match: {protocol: http1, host: "*.example.com"}
        backend: web
      - match: {protocol: http1, path: "/deny/*"}
        reject: true
      - match: {protocol: tls, sni: secure.example.com}
        backend: web
    on_timeout: ssh
    default: other
backends:
  web: {servers: ["10.0.0.1:80", "10.0.0.2:80"], connect_timeout: 1s}
  ssh: {servers: ["10.0.0.3:22"]}
  other: {servers: ["10.0.0.4:9"]}
"""


class Harness:
    def __init__(self, config=CONFIG):
        self.reactor = MemoryReactorClock()
        detectors = installed_detectors()
        self.config = parse_config(config, detectors)
        listener = self.config.listeners[0]
        self.registry = CollectorRegistry()
        metrics = RouterMetrics(self.registry)
        groups = {
            name: BackendGroup(b, self.reactor, metrics) for name, b in self.config.backends.items()
        }
        for group in groups.values():
            group.open_connection = RecordedConnect
        self.factory = ListenerFactory(
            listener,
            DetectorSet(detectors_for(detectors, "tcp")),
            groups,
            Admission(LocalLimit(), listener.max_connections, listener.max_connections_per_source),
            metrics.for_listener("edge"),
            self.reactor,
        )

    def client(self, port=40000):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", port))
        if protocol is None:
            return None, None
        transport = TCPTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def connect_attempt(self, index=-1):
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        return (host, port, timeout), factory

    def accept_backend(self, factory):
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 80))
        transport = TCPTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def tick(self, seconds):
        """Advance time a second at a time, as a running reactor would fire timers."""
        for _ in range(seconds):
            self.reactor.advance(1)

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels)


REQUEST = b"GET /index.html HTTP/1.1\r\nHost: www.Example.com\r\n\r\n"


def relayed(harness, first_bytes=REQUEST):
    client, client_transport = harness.client()
    client.dataReceived(first_bytes)
    _, factory = harness.connect_attempt()
    backend, backend_transport = harness.accept_backend(factory)
    return client, client_transport, backend, backend_transport


def test_http1_routed_by_host_replays_bytes_then_relays():
    harness = Harness()
    client, client_transport = harness.client()
    client.dataReceived(REQUEST[:10])
    assert harness.reactor.tcpClients == []  # still undecided
    client.dataReceived(REQUEST[10:])
    (host, port, timeout), factory = harness.connect_attempt()
    # The connect timeout is the group's shared deadline (test_e2e_backends sees it expire).
    assert (host, port, timeout) == ("10.0.0.1", 80, None)
    # Read on while connecting (no epoll_ctl to pause and resume), up to max_bytes (64).
    client.dataReceived(b"early")
    assert client_transport.producerState == "producing"
    client.dataReceived(b"0123456789")
    assert client_transport.producerState == "paused"
    backend, backend_transport = harness.accept_backend(factory)
    assert backend_transport.value() == REQUEST + b"early0123456789"  # in order
    assert client_transport.producerState == "producing"
    assert backend_transport.producer is client_transport
    assert client_transport.producer is backend_transport
    client.dataReceived(b"more")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert backend_transport.value() == REQUEST + b"early0123456789more"
    assert client_transport.value() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert (
        harness.metric(
            "l4router_connections_routed_total",
            listener="edge",
            protocol="http1",
            route="routes[0]",
            backend="web",
        )
        == 1
    )


def test_half_close_is_passed_on_and_both_fins_complete():
    harness = Harness()
    client, client_transport, backend, backend_transport = relayed(harness)
    client.readConnectionLost()
    assert backend_transport.write_closed
    assert not client_transport.disconnecting
    backend.dataReceived(b"reply after the client's FIN")
    assert client_transport.value() == b"reply after the client's FIN"
    backend.readConnectionLost()
    assert client_transport.disconnecting and backend_transport.disconnecting
    client.connectionLost(Failure(ConnectionLost()))
    backend.connectionLost(None)
    assert (
        harness.metric("l4router_connections_closed_total", listener="edge", reason="completed")
        == 1
    )
    assert harness.metric(
        "l4router_bytes_relayed_total", listener="edge", direction="downstream"
    ) == len(b"reply after the client's FIN")
    assert harness.metric(
        "l4router_bytes_relayed_total", listener="edge", direction="upstream"
    ) == len(REQUEST)
    assert harness.metric("l4router_connections_active", listener="edge") == 0


def test_backend_reset_closes_the_client_after_flushing():
    harness = Harness()
    client, client_transport, backend, backend_transport = relayed(harness)
    backend.connectionLost(Failure(ConnectionLost()))
    assert client_transport.disconnecting and not client_transport.aborted
    client.connectionLost(None)
    assert (
        harness.metric("l4router_connections_closed_total", listener="edge", reason="backend_reset")
        == 1
    )


def test_silent_client_goes_to_on_timeout_after_detect_timeout():
    harness = Harness()
    harness.client()
    harness.reactor.advance(1.9)
    assert harness.reactor.tcpClients == []
    harness.reactor.advance(0.2)
    (host, port, _), _ = harness.connect_attempt()
    assert (host, port) == ("10.0.0.3", 22)
    assert (
        harness.metric(
            "l4router_connections_routed_total",
            listener="edge",
            protocol="timeout",
            route="on_timeout",
            backend="ssh",
        )
        == 1
    )


def test_unknown_bytes_go_to_default():
    harness = Harness()
    client, _ = harness.client()
    client.dataReceived(b"\x00\x01binary")
    (host, port, _), _ = harness.connect_attempt()
    assert (host, port) == ("10.0.0.4", 9)


def test_max_bytes_ends_detection_and_replays_everything():
    harness = Harness()
    client, _ = harness.client()
    head = b"GET /" + b"a" * 100  # an undecided http1 prefix longer than max_bytes (64)
    client.dataReceived(head)
    (host, _, _), factory = harness.connect_attempt()
    assert host == "10.0.0.4"  # unknown -> default
    _, backend_transport = harness.accept_backend(factory)
    assert backend_transport.value() == head


def test_reject_route_closes_at_once():
    harness = Harness()
    client, client_transport = harness.client()
    client.dataReceived(b"GET /deny/x HTTP/1.1\r\nHost: other.org\r\n\r\n")
    assert client_transport.disconnecting
    assert harness.reactor.tcpClients == []
    client.connectionLost(None)
    assert (
        harness.metric("l4router_connections_rejected_total", listener="edge", reason="rejected")
        == 1
    )


def test_refused_server_fails_over_with_backoff_then_client_is_closed():
    harness = Harness()
    client, client_transport = harness.client()
    client.dataReceived(REQUEST)
    # web: two servers, retry defaults (3 attempts, 50 ms initial backoff doubling, 20% jitter)
    # After each server failed once, the third attempt may go to either.
    expected = [("10.0.0.1", 0.0), ("10.0.0.2", 0.05), (None, 0.1)]
    for index, (expected_host, backoff) in enumerate(expected):
        if backoff:
            harness.reactor.advance(backoff * 0.79)
            assert len(harness.reactor.tcpClients) == index  # still backing off
            harness.reactor.advance(backoff * 0.42)
        (host, _, _), factory = harness.connect_attempt()
        assert len(harness.reactor.tcpClients) == index + 1
        assert host == (expected_host or host)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert client_transport.disconnecting
    client.connectionLost(None)
    assert (
        sum(
            harness.metric(
                "l4router_backend_connect_failures_total",
                backend="web",
                server=server,
                reason="refused",
            )
            for server in ("10.0.0.1:80", "10.0.0.2:80")
        )
        == 3
    )
    assert harness.metric("l4router_backend_retries_total", backend="web") == 2
    assert (
        harness.metric(
            "l4router_connections_closed_total", listener="edge", reason="connect_failed"
        )
        == 1
    )


def test_idle_relay_is_aborted_between_one_and_one_and_a_quarter_timeouts():
    harness = Harness()
    client, client_transport, backend, backend_transport = relayed(harness)
    harness.tick(35)
    backend.dataReceived(b"x")  # activity restarts the idle clock
    harness.tick(39)
    assert not client_transport.aborted
    harness.tick(11)
    assert client_transport.aborted and backend_transport.aborted
    client.connectionLost(Failure(ConnectionLost()))
    backend.connectionLost(Failure(ConnectionLost()))
    assert (
        harness.metric("l4router_connections_closed_total", listener="edge", reason="idle_timeout")
        == 1
    )
    assert not harness.reactor.getDelayedCalls()


def test_client_gone_while_connecting_cancels_the_connect():
    harness = Harness()
    client, _ = harness.client()
    client.dataReceived(REQUEST)
    client.connectionLost(Failure(ConnectionLost()))
    assert harness.metric("l4router_connections_active", listener="edge") == 0
    assert (
        harness.metric("l4router_connections_closed_total", listener="edge", reason="client_reset")
        == 1
    )


def test_listener_limit_refuses_without_a_protocol():
    harness = Harness()
    assert harness.client(1)[0] is not None
    assert harness.client(2)[0] is not None
    assert harness.client(3)[0] is None
    assert (
        harness.metric(
            "l4router_connections_rejected_total", listener="edge", reason="limit_listener"
        )
        == 1
    )


@pytest.mark.parametrize("cut", range(1, len(REQUEST)))
def test_request_in_two_segments_is_routed_the_same(cut):
    harness = Harness()
    client, _ = harness.client()
    client.dataReceived(REQUEST[:cut])
    client.dataReceived(REQUEST[cut:])
    (host, _, _), _ = harness.connect_attempt()
    assert host == "10.0.0.1"


PROXY_CONFIG = """
listeners:
  - name: edge
    listen: "127.0.0.1:8000"
    accept_proxy_protocol: {from: [192.0.2.0/24]}
    max_connections_per_source: 1
    routes:
      - match: {source: 203.0.113.0/24}
        backend: web
    default: other
backends:
  web: {servers: ["10.0.0.1:80"]}
  other: {servers: ["10.0.0.4:9"]}
"""


@pytest.mark.parametrize(
    "header",
    [
        proxyprotocol.v1_header("203.0.113.9", 5555, "192.0.2.1", 443),
        proxyprotocol.v2_header("203.0.113.9", 5555, "192.0.2.1", 443),
    ],
)
def test_proxy_header_in_pieces_sets_the_source_and_is_not_replayed(header):
    harness = Harness(PROXY_CONFIG)
    client, _ = harness.client()
    flight = header + REQUEST
    for index in range(len(flight)):  # one byte at a time
        client.dataReceived(flight[index : index + 1])
    (host, _, _), factory = harness.connect_attempt()
    assert host == "10.0.0.1"  # routed by the source the header carries
    assert client.source == "203.0.113.9" and client.source_port == 5555
    _, backend_transport = harness.accept_backend(factory)
    assert backend_transport.value() == REQUEST


@pytest.mark.parametrize("flight", [REQUEST, b"PROXY TCP4 1.2.3.4\r\n", b"PROXY UNKNOWN"])
def test_missing_or_bad_proxy_header_is_rejected(flight):
    harness = Harness(PROXY_CONFIG)
    client, transport = harness.client()
    client.dataReceived(flight)
    if not transport.disconnecting:  # incomplete: the detect timeout ends it
        harness.tick(4)
    assert transport.disconnecting
    assert harness.reactor.tcpClients == []
    assert (
        harness.metric(
            "l4router_connections_rejected_total", listener="edge", reason="proxy_protocol"
        )
        == 1
    )


def test_per_source_limit_uses_the_source_from_the_header():
    harness = Harness(PROXY_CONFIG)
    header = proxyprotocol.v1_header("203.0.113.9", 1, "192.0.2.1", 443)
    first, _ = harness.client(1)
    first.dataReceived(header)
    second, second_transport = harness.client(2)
    second.dataReceived(header)
    assert second_transport.disconnecting
    assert (
        harness.metric(
            "l4router_connections_rejected_total", listener="edge", reason="limit_source"
        )
        == 1
    )
    other, other_transport = harness.client(3)
    other.dataReceived(proxyprotocol.v1_header("198.51.100.1", 1, "192.0.2.1", 443))
    assert not other_transport.disconnecting


@pytest.mark.parametrize("relay_class", [Relay, SpliceRelay])
def test_both_relays_provide_the_one_relay_interface(relay_class):
    verifyClass(IRelay, relay_class)


def test_an_ended_connection_is_freed_at_once_without_the_garbage_collector():
    """No reference cycle is left behind (the relay and the connection, the connect attempt
    and its Deferred): what a connection built is freed as it ends, not at a collection, whose
    pauses would show in the latency's tail."""
    harness = Harness()
    collecting = gc.isenabled()
    gc.disable()
    try:
        client, client_transport, backend, backend_transport = relayed(harness)
        left = [weakref.ref(o) for o in (client, client.relay, backend, client.decision)]
        client.readConnectionLost()
        backend.readConnectionLost()
        client.connectionLost(None)
        backend.connectionLost(None)
        assert harness.metric("l4router_connections_active", listener="edge") == 0
        del client, client_transport, backend, backend_transport
        harness.reactor.tcpClients.clear()  # the test's own record of the connect
        assert [ref() for ref in left] == [None] * len(left)
    finally:
        if collecting:
            gc.enable()


FALLBACK_CONFIG = """
listeners:
  - name: edge
    listen: "127.0.0.1:8000"
    routes:
      - match: {protocol: http1}
        backend: web
        fallback: spare
    default: reject
backends:
  web: {servers: ["10.0.0.1:80"]}
  spare: {servers: ["10.0.0.9:80"]}
"""


def test_a_client_gone_while_connecting_to_the_fallback_cancels_that_connect():
    """The route's backend has no server up: its fallback is tried at once, from within the
    first connect's report; a client that leaves then stops the fallback's connect."""
    harness = Harness(FALLBACK_CONFIG)
    harness.factory.backends["web"].servers[0].set_admin_state("disabled")
    client, _ = harness.client()
    client.dataReceived(REQUEST)
    (host, port, _), attempt = harness.connect_attempt()
    assert (host, port) == ("10.0.0.9", 80)
    stopped = []
    failed = attempt.failed
    attempt.failed = lambda reason: (stopped.append(reason), failed(reason))
    client.connectionLost(Failure(ConnectionLost()))
    assert [reason.type for reason in stopped] == [UserError]
    spare = harness.factory.backends["spare"].servers[0]
    assert spare.active == 0  # released
    assert (
        harness.metric("l4router_connections_closed_total", listener="edge", reason="client_reset")
        == 1
    )
