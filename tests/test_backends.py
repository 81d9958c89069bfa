"""Balancing, health, retries and pools, driven with MemoryReactorClock (no sockets)."""

import collections

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from l4router.backends.balancing import (
    LeastConnections,
    SmoothWeightedRoundRobin,
    SourceHash,
    WeightedRandom,
)
from l4router.backends.control import Change, ControlError, RuntimeState, apply_change
from l4router.backends.group import BackendGroup
from l4router.config import Backend, HealthCheckSettings, PoolSettings, RetrySettings, Server
from l4router.errors import BackendUnavailable
from l4router.operate.metrics import RouterMetrics
from tests.memory_tcp import RecordedConnect, TCPTransport


class Candidate:
    def __init__(self, label, weight=1, active=0):
        self.label, self.weight, self.active, self.current_weight = label, weight, active, 0


def shares(policy, candidates, rounds, source=lambda i: None):
    counts = collections.Counter(policy.choose(candidates, source(i)).label for i in range(rounds))
    return {c.label: counts[c.label] / rounds for c in candidates}


def test_smooth_round_robin_is_exact_and_interleaved():
    servers = [Candidate("a"), Candidate("b"), Candidate("c", 2)]
    policy = SmoothWeightedRoundRobin()
    sequence = [policy.choose(servers, None).label for _ in range(8)]
    assert sequence == ["c", "a", "b", "c", "c", "a", "b", "c"]


def test_weighted_random_follows_weights():
    import random

    result = shares(WeightedRandom(random.Random(7)), [Candidate("a"), Candidate("b", 3)], 20000)
    assert abs(result["b"] - 0.75) < 0.02


def test_least_connections_prefers_the_least_loaded_per_weight():
    servers = [Candidate("a", 1, active=3), Candidate("b", 2, active=4), Candidate("c", 1, 5)]
    assert LeastConnections().choose(servers, None).label == "b"  # 4/2 < 3/1 < 5/1


def test_source_hash_is_sticky_and_moves_only_the_removed_servers_sources():
    servers = [Candidate(f"10.0.0.{i}:80") for i in range(1, 6)]
    policy = SourceHash()
    sources = [f"192.0.2.{i}" for i in range(1, 255)] + [f"2001:db8::{i:x}" for i in range(300)]
    before = {s: policy.choose(servers, s).label for s in sources}
    assert before == {s: policy.choose(servers, s).label for s in sources}
    removed = servers[2]
    after = {s: policy.choose([x for x in servers if x is not removed], s).label for s in sources}
    moved = {s for s in sources if before[s] != after[s]}
    assert moved == {s for s in sources if before[s] == removed.label}
    counts = collections.Counter(before.values())
    assert min(counts.values()) > len(sources) / 5 * 0.7  # spread evenly enough
    added = servers + [Candidate("10.0.0.9:80")]
    regained = {s for s in sources if policy.choose(added, s).label != before[s]}
    assert len(regained) < len(sources) / 6 * 1.4  # about 1/N move to the new one


class Harness:
    def __init__(self, **settings):
        self.reactor = MemoryReactorClock()
        self.registry = CollectorRegistry()
        servers = settings.pop("servers", (Server("10.0.0.1", 80), Server("10.0.0.2", 80)))
        self.group = BackendGroup(
            Backend("web", servers, **settings), self.reactor, RouterMetrics(self.registry)
        )
        self.group.open_connection = RecordedConnect

    def attempt(self, index=-1):
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        return host, factory

    def accept(self, factory):
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 80))
        transport = TCPTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self, factory):
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels) or 0


def test_health_checks_take_a_server_out_after_fall_and_back_after_rise():
    harness = Harness(health_check=HealthCheckSettings(interval=1, timeout=0.5, rise=2, fall=3))
    group = harness.group
    group.start()
    down = group.servers[1]
    answered = 0

    def answer_checks(refuse_second):
        nonlocal answered
        for host, _, factory, _, _ in harness.reactor.tcpClients[answered:]:
            if host == "10.0.0.2" and refuse_second:
                harness.refuse(factory)
            else:
                harness.accept(factory)
        answered = len(harness.reactor.tcpClients)

    for _ in range(3):
        answer_checks(refuse_second=True)
        harness.reactor.advance(1)
    answer_checks(refuse_second=True)
    assert not down.healthy
    assert harness.metric("l4router_backend_server_up", backend="web", server="10.0.0.2:80") == 0
    for _ in range(4):  # while down it gets no clients
        group.connect("192.0.2.1")
        assert harness.attempt()[0] == "10.0.0.1"
        answer_checks(refuse_second=False)
    for _ in range(2):
        harness.reactor.advance(1)
        answer_checks(refuse_second=False)
    assert down.healthy
    assert (
        harness.metric(
            "l4router_backend_health_checks_total",
            backend="web",
            server="10.0.0.2:80",
            result="failed",
        )
        >= 3
    )
    group.stop()


def test_every_server_down_fails_at_once_with_no_healthy_server():
    harness = Harness(health_check=HealthCheckSettings(interval=1, timeout=0.5, rise=1, fall=1))
    for server in harness.group.servers:
        server.set_healthy(False, "test")
    failure = []
    harness.group.connect("192.0.2.1").addErrback(failure.append)
    assert failure[0].value.reason == "no_healthy_server"
    assert harness.reactor.tcpClients == []


def test_full_servers_are_skipped_and_all_full_is_backend_full():
    harness = Harness(max_connections_per_server=1)
    first = []
    harness.group.connect("192.0.2.1").addCallback(first.append)
    harness.accept(harness.attempt()[1])
    harness.group.connect("192.0.2.2")
    assert harness.attempt()[0] != harness.attempt(0)[0]  # the full one was skipped
    failure = []
    harness.group.connect("192.0.2.3").addErrback(failure.append)
    assert isinstance(failure[0].value, BackendUnavailable)
    assert failure[0].value.reason == "backend_full"
    first[0][0].release()
    harness.group.connect("192.0.2.4")
    assert len(harness.reactor.tcpClients) == 3


def test_pool_keeps_min_idle_spares_and_never_hands_out_a_spoiled_one():
    harness = Harness(
        servers=(Server("10.0.0.1", 80),),
        pool=PoolSettings(min_idle=2, max_idle=4, idle_timeout=10, max_lifetime=30),
    )
    harness.group.start()
    assert len(harness.reactor.tcpClients) == 2
    spares = [harness.accept(harness.attempt(i)[1]) for i in range(2)]
    pool = harness.group.servers[0].pool
    assert pool.idle_count == 2
    spoiled, spoiled_transport = spares[0]
    spoiled.dataReceived(b"unexpected greeting")  # the server spoke first: not usable
    assert pool.idle_count == 1 and spoiled_transport.disconnecting
    assert len(harness.reactor.tcpClients) == 3  # refilling
    handed = []
    harness.group.connect("192.0.2.1").addCallback(handed.append)
    server, backend_side = handed[0]
    assert backend_side is spares[1][0]._wrappedProtocol  # the endpoint wraps it
    assert harness.metric("l4router_backend_pool_requests_total", backend="web", result="hit") == 1
    assert len(harness.reactor.tcpClients) == 4  # and refilling again


def test_pool_spares_expire_and_failed_refills_back_off():
    harness = Harness(
        servers=(Server("10.0.0.1", 80),),
        pool=PoolSettings(min_idle=1, max_idle=1, idle_timeout=5, max_lifetime=30),
    )
    harness.group.start()
    spare, transport = harness.accept(harness.attempt()[1])
    harness.reactor.advance(5)
    assert transport.disconnecting  # idle too long
    harness.refuse(harness.attempt()[1])  # the refill fails ...
    attempts = len(harness.reactor.tcpClients)
    harness.reactor.advance(0.05)
    assert len(harness.reactor.tcpClients) == attempts  # ... and waits before the next one
    harness.reactor.advance(0.1)
    assert len(harness.reactor.tcpClients) == attempts + 1
    harness.group.stop()


def test_retry_backoff_grows_and_is_capped():
    retry = RetrySettings(attempts=6, initial_backoff=0.1, max_backoff=0.5, multiplier=2)
    assert [retry.backoff(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]


@pytest.mark.parametrize("policy", ["round_robin", "random", "least_connections", "source_hash"])
def test_every_policy_fails_over_to_the_other_server(policy):
    harness = Harness(balance=policy, retry=RetrySettings(attempts=2, jitter=0))
    connected = []
    harness.group.connect("192.0.2.1").addCallback(connected.append)
    first, factory = harness.attempt()
    harness.refuse(factory)
    harness.reactor.advance(0.05)
    second, factory = harness.attempt()
    assert second != first
    harness.accept(factory)
    assert connected[0][0].label == f"{second}:80"


def test_the_status_page_of_starting_workers_says_starting_and_shows_the_config():
    """Before any worker reports, the supervisor's views come from the config."""
    from types import SimpleNamespace

    from l4router.config import parse_config
    from l4router.detection.registry import installed_detectors
    from l4router.operate.status_page import render_status_page
    from l4router.operate.worker_status import WorkerStatus

    config = parse_config(
        """
listeners:
  - name: front
    listen: "127.0.0.1:8443"
    routes:
      - {name: web, match: {protocol: tls}, backend: web}
    default: reject
backends:
  web: {servers: ["127.0.0.1:9443", {address: "127.0.0.1:9444", backup: true}]}
""",
        installed_detectors(),
    )
    supervisor = SimpleNamespace(workers={}, config=config, ready=False, draining=False)
    views = []
    WorkerStatus(MemoryReactorClock(), supervisor).overview().addCallback(views.append)
    [view] = views
    assert view["state"] == "starting" and view["workers"] == 0
    page = render_status_page(view)
    assert "<b>starting</b>" in page and "front" in page and "127.0.0.1:9444 (backup)" in page
    assert "unknown" in page and "DOWN" not in page


# Runtime control (l4router.backends.control)


def _runtime_change(state, groups, backend, action, server, **query):
    change = Change.from_query(backend, action, server, {k: [str(v)] for k, v in query.items()})
    state.check(change, {name: group.config for name, group in groups.items()})
    state.record(change)
    return apply_change(change, groups, connections=[])


def test_drained_and_disabled_servers_get_no_new_client_and_the_backup_tier_follows():
    servers = (Server("10.0.0.1", 80), Server("10.0.0.2", 80), Server("10.0.0.3", 80, 1, True))
    harness = Harness(servers=servers)
    groups = {"web": harness.group}
    state = RuntimeState()
    _runtime_change(state, groups, "web", "drain", "10.0.0.1:80")
    assert {harness.group.choose("c", {}).label for _ in range(6)} == {"10.0.0.2:80"}
    assert not harness.group.using_backup()
    _runtime_change(state, groups, "web", "disable", "10.0.0.2:80")
    assert harness.group.using_backup()  # no primary takes clients: the backup tier serves
    assert harness.group.choose("c", {}).label == "10.0.0.3:80"
    assert harness.metric("l4router_backend_backup_serving", backend="web") == 1
    assert (
        harness.metric(
            "l4router_backend_server_admin_state",
            backend="web",
            server="10.0.0.2:80",
            state="disabled",
        )
        == 1
    )
    assert (
        harness.metric(
            "l4router_backend_server_admin_state",
            backend="web",
            server="10.0.0.2:80",
            state="enabled",
        )
        == 0
    )
    _runtime_change(state, groups, "web", "enable", "10.0.0.2:80")
    assert harness.group.choose("c", {}).label == "10.0.0.2:80"


def test_runtime_changes_are_checked_and_applied_again_to_groups_built_later(tmp_path):
    path = str(tmp_path / "state.json")
    harness = Harness()
    groups = {"web": harness.group}
    state = RuntimeState(path)
    _runtime_change(state, groups, "web", "weight", "10.0.0.1:80", weight=5)
    _runtime_change(state, groups, "web", "add", "10.0.0.9:8080", weight=2, backup=1)
    _runtime_change(state, groups, "web", "remove", "10.0.0.2:80")
    _runtime_change(state, groups, "web", "drain", "10.0.0.9:8080")
    for backend, action, server, status in (
        ("nope", "drain", "10.0.0.1:80", 404),
        ("web", "drain", "10.0.0.2:80", 404),  # removed
        ("web", "add", "10.0.0.1:80", 409),
        ("web", "add", "no-port", 400),
    ):
        with pytest.raises(ControlError) as raised:
            state.check(
                Change.from_query(backend, action, server, {}), {"web": harness.group.config}
            )
        assert raised.value.status == status, (action, server)
    with pytest.raises(ControlError, match="keeps at least one server") as raised:
        RuntimeState().check(
            Change.from_query("web", "remove", "10.0.0.1:80", {}),
            {"web": Backend("web", (Server("10.0.0.1", 80),))},
        )
    with pytest.raises(ControlError, match="weight must be 1..1000"):
        Change.from_query("web", "weight", "10.0.0.1:80", {"weight": ["0"]})
    with pytest.raises(ControlError, match="unknown action"):
        Change.from_query("web", "explode", "10.0.0.1:80", {})
    # A reload or a worker's start: new groups, the same changes (read from the file).
    rebuilt = Harness().group
    RuntimeState(path, writable=False).apply({"web": rebuilt})
    assert [(s.label, s.weight, s.backup, s.admin_state) for s in rebuilt.servers] == [
        ("10.0.0.1:80", 5, False, "enabled"),
        ("10.0.0.9:8080", 2, True, "draining"),
    ]
    # A config without 10.0.0.1 drops what was recorded of it; a server added at run time
    # stays while its backend does.
    state.forget_missing({"web": Backend("web", (Server("10.0.0.7", 80),))})
    assert RuntimeState(path).servers == {"web": {"10.0.0.9:8080": {"state": "draining"}}}
    state.forget_missing({})
    saved = RuntimeState(path)
    assert (saved.servers, saved.added, saved.removed) == ({}, {}, {})
