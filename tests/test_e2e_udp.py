"""UDP through the real router process: DNS by zone, QUIC by SNI, expiry, limits, fuzzing."""

import os
import random
import select
import socket
import subprocess
import sys
import threading
import time

import dns.message
import dns.rrset
import pytest
import trustme

from tests.dns_peer import DNSServer
from tests.support import Router, free_port, wait_until

pytestmark = pytest.mark.timeout(180)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def queries_answered(port, sources, settle=1.0):
    """One DNS query from each source address (None: any), all at once; how many were
    answered within `settle` seconds."""
    clients = []
    try:
        for source in sources:
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            clients.append(client)
            if source is not None:
                client.bind((source, 0))
            client.sendto(
                dns.message.make_query("a.alpha.test", "A").to_wire(), ("127.0.0.1", port)
            )
        time.sleep(settle)  # every answer there is has come by now
        answered = 0
        for client in clients:
            client.setblocking(False)
            try:
                client.recvfrom(4096)
                answered += 1
            except BlockingIOError:
                pass
        return answered
    finally:
        for client in clients:
            client.close()


def dns_config(port, alpha, beta, extra=""):
    return f"""
listeners:
  - name: dns
    transport: udp
    listen: "127.0.0.1:{port}"
    idle_timeout: 2s
    {extra}
    routes:
      - match: {{protocol: dns, qname: ["alpha.test", "*.alpha.test"]}}
        backend: alpha
      - match: {{protocol: dns, qname: "*.beta.test"}}
        backend: beta
    default: reject
backends:
  alpha: {{servers: ["127.0.0.1:{alpha.port}"]}}
  beta: {{servers: ["127.0.0.1:{beta.port}"]}}
"""


def test_10000_dns_queries_from_50_ports_routed_by_zone(tmp_path):
    with DNSServer("10.0.0.1") as alpha, DNSServer("10.0.0.2") as beta:
        port = free_port()
        with Router(tmp_path, dns_config(port, alpha, beta)) as router:
            answers, lost, wrong = [], [], []

            def client(index):
                # A session is routed by its first datagram, as a resolver's source port is
                # for one upstream: each port asks one zone.
                zone = "alpha" if index % 2 else "beta"
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(1.0)
                    for n in range(200):
                        query = dns.message.make_query(f"h{index}-{n}.{zone}.test", "A")
                        sock.sendto(query.to_wire(), ("127.0.0.1", port))
                        try:
                            while True:  # skip a late answer to an earlier, timed-out query
                                reply = dns.message.from_wire(sock.recvfrom(4096)[0])
                                if reply.id == query.id:
                                    break
                        except socket.timeout:
                            lost.append((index, n))
                            continue
                        address = reply.answer[0][0].address
                        expected = "10.0.0.1" if zone == "alpha" else "10.0.0.2"
                        (answers if address == expected else wrong).append(address)

            threads = [threading.Thread(daemon=True, target=client, args=(i,)) for i in range(50)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not wrong
            assert len(answers) + len(lost) == 10000
            assert len(lost) <= 20, f"{len(lost)} lost (each after a 1 s timeout)"
            assert alpha.queries + beta.queries >= len(answers)
            assert (
                router.metric("l4router_udp_sessions_created_total", listener="dns", protocol="dns")
                == 50
            )
            assert (
                router.metric("l4router_udp_datagrams_total", listener="dns", direction="upstream")
                == 10000
            )


@pytest.fixture(scope="module")
def quic_servers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quic")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    servers = {}
    processes = []
    for name in ("alpha", "beta"):
        cert = ca.issue_cert(f"{name}.quic.test", "big.quic.test" if name == "beta" else "x.test")
        cert.private_key_pem.write_to_path(str(folder / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(folder / f"{name}.pem"))
        port = free_port()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.quic_peers",
                "serve",
                name,
                str(port),
                str(folder / f"{name}.pem"),
                str(folder / f"{name}.key"),
            ],
            cwd=CHECKOUT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "listening"
        servers[name] = port
        processes.append(process)
    yield servers, folder / "ca.pem"
    for process in processes:
        process.terminate()
        process.wait(10)


def http3_get(port, server_name, ca, big=False):
    command = [sys.executable, "-m", "tests.quic_peers", "get", str(port), server_name, str(ca)]
    result = subprocess.run(
        command + (["--big"] if big else []),
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout


def test_http3_over_quic_routed_by_sni_to_two_aioquic_servers(tmp_path, quic_servers):
    servers, ca = quic_servers
    port = free_port()
    config = f"""
listeners:
  - name: h3
    transport: udp
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{protocol: quic, sni: "alpha.quic.test", alpn: h3}}
        backend: alpha
      - match: {{protocol: quic, sni: ["beta.quic.test", "big.quic.test"]}}
        backend: beta
    default: reject
backends:
  alpha: {{servers: ["127.0.0.1:{servers["alpha"]}"]}}
  beta: {{servers: ["127.0.0.1:{servers["beta"]}"]}}
"""
    with Router(tmp_path, config) as router:
        # The handshakes complete only with the right server: each has its own certificate.
        assert http3_get(port, "alpha.quic.test", ca) == "alpha /hello"
        assert http3_get(port, "beta.quic.test", ca) == "beta /hello"
        # A ClientHello in two Initial packets is still routed by its SNI.
        assert http3_get(port, "big.quic.test", ca, big=True) == "beta /hello"
        created = router.metric(
            "l4router_udp_sessions_created_total", listener="h3", protocol="quic"
        )
        assert created == 3


def test_sessions_expire_limits_reject_and_random_datagrams_do_no_harm(tmp_path):
    with DNSServer("10.0.0.1") as alpha, DNSServer("10.0.0.2") as beta:
        port = free_port()
        config = dns_config(port, alpha, beta, extra="max_sessions: 3").replace(
            "idle_timeout: 2s", "idle_timeout: 500ms"
        )
        with Router(tmp_path, config) as router:
            sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
            try:
                for sock in sockets:
                    sock.settimeout(1.0)
                    sock.sendto(
                        dns.message.make_query("a.alpha.test", "A").to_wire(), ("127.0.0.1", port)
                    )
                for sock in sockets[:3]:
                    assert dns.message.from_wire(sock.recvfrom(4096)[0]).answer
                with pytest.raises(socket.timeout):
                    sockets[3].recvfrom(4096)
            finally:
                for sock in sockets:
                    sock.close()
            assert (
                router.metric(
                    "l4router_udp_datagrams_dropped_total", listener="dns", reason="limit_listener"
                )
                == 1
            )
            wait_until(
                lambda: (
                    router.metric(
                        "l4router_udp_sessions_ended_total", listener="dns", reason="idle_timeout"
                    )
                    == 3
                ),
                timeout=5,
                message="the sessions to expire",
            )
            assert router.metric("l4router_udp_sessions_active", listener="dns") == 0
            # 1 MiB of random datagrams from many source ports.
            generator = random.Random(5)
            sent = 0
            fuzzers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
            while sent < 1 << 20:
                datagram = generator.randbytes(generator.randint(1, 1400))
                fuzzers[sent % 3].sendto(datagram, ("127.0.0.1", port))
                sent += len(datagram)
                if sent % 50 == 0:
                    time.sleep(0.001)
            for fuzzer in fuzzers:
                fuzzer.close()
            time.sleep(1.5)  # let the fuzz sessions expire
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(2.0)
                sock.sendto(
                    dns.message.make_query("z.beta.test", "A").to_wire(), ("127.0.0.1", port)
                )
                reply = dns.message.from_wire(sock.recvfrom(4096)[0])
            assert reply.answer[0][0].address == "10.0.0.2"
            assert router.process.poll() is None
            assert "Traceback" not in router.log_text()


def test_icmp_unreachable_from_the_backend_ends_the_session_and_is_counted(tmp_path):
    dead = free_port()  # no UDP socket there: the kernel answers ICMP port unreachable
    port = free_port()
    config = f"""
listeners:
  - name: udp
    transport: udp
    listen: "127.0.0.1:{port}"
    default: dead
backends:
  dead: {{servers: ["127.0.0.1:{dead}"]}}
"""
    with Router(tmp_path, config) as router:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"\x01hello", ("127.0.0.1", port))
            wait_until(
                lambda: (
                    router.metric(
                        "l4router_udp_sessions_ended_total",
                        listener="udp",
                        reason="backend_unreachable",
                    )
                    == 1
                ),
                message="the session to end on ICMP unreachable",
            )
        assert router.metric("l4router_udp_sessions_active", listener="udp") == 0
        assert router.access_events()[0]["reason"] == "backend_unreachable"


class RebindingForwarder:
    """A NAT in front of the router: it relays a client's datagrams from one source port
    and, once `rebind()` is called, from another (the client knows nothing of it). With
    `on_new_id`, it moves by itself, just before the first short-header packet whose
    destination connection ID (of `id_length` octets) differs from the earlier ones'."""

    def __init__(self, router_port, on_new_id=False, id_length=10):
        self.on_new_id = on_new_id
        self.id_length = id_length
        self.first_id = None
        self.router = ("127.0.0.1", router_port)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.upstreams = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        for upstream in self.upstreams:
            upstream.bind(("127.0.0.1", 0))
        self.current = 0
        self.client = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def rebind(self):
        self.current = 1

    def run(self):
        sockets = [self.front, *self.upstreams]
        while not self.stop.is_set():
            readable, _, _ = select.select(sockets, [], [], 0.1)
            for sock in readable:
                data, sender = sock.recvfrom(65535)
                if sock is self.front:
                    self.client = sender
                    if self.on_new_id and data[0] & 0xC0 == 0x40:
                        connection_id = data[1 : 1 + self.id_length]
                        self.first_id = self.first_id or connection_id
                        if connection_id != self.first_id:
                            self.rebind()
                    self.upstreams[self.current].sendto(data, self.router)
                elif self.client is not None:
                    self.front.sendto(data, self.client)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(10)
        for sock in [self.front, *self.upstreams]:
            sock.close()


def two_requests_across_a_move(nat, server_name, ca, new_id=False):
    """Two HTTP/3 requests on one aioquic connection through `nat`, which moves the client
    to a new port between them (by itself, `on_new_id`, as the client takes a new connection
    ID); the two bodies."""
    client = subprocess.Popen(
        [sys.executable, "-m", "tests.quic_peers", "twice", str(nat.port), server_name, str(ca)]
        + (["--new-cid"] if new_id else []),
        cwd=CHECKOUT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = client.stdout.readline().strip()
        if not nat.on_new_id:
            nat.rebind()
        client.stdin.write("go\n")
        client.stdin.flush()
        return first, client.stdout.readline().strip()
    finally:
        client.kill()
        client.wait(10)


def test_a_quic_connection_follows_its_client_to_a_new_address(tmp_path, quic_servers):
    """The client's address changes mid-connection (a NAT rebinding): its short-header
    packets are known by the server's connection ID and go on to the same server."""
    servers, ca = quic_servers
    port = free_port()
    config = f"""
listeners:
  - name: h3
    transport: udp
    listen: "127.0.0.1:{port}"
    routes:
      - {{match: {{protocol: quic, sni: alpha.quic.test}}, backend: alpha}}
    default: reject
backends:
  alpha: {{servers: ["127.0.0.1:{servers["alpha"]}"]}}
"""
    with Router(tmp_path, config) as router, RebindingForwarder(port) as nat:
        first, second = two_requests_across_a_move(nat, "alpha.quic.test", ca)
        migrated = router.metric("l4router_udp_sessions_migrated_total", listener="h3")
        created = router.metric(
            "l4router_udp_sessions_created_total", listener="h3", protocol="quic"
        )
    assert (first, second) == ("alpha /one", "alpha /two")
    assert (migrated, created) == (1, 1)


def test_quic_lb_sends_a_client_on_a_new_connection_id_to_its_server(tmp_path):
    """The client moves to a connection ID its server issued encrypted (active migration)
    from a new address: the router never saw that ID, but the server ID QUIC-LB put in it
    names the server. Two servers: the right one must get it."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    servers, processes = {}, []
    try:
        for name, lb_id in (("one", "01"), ("two", "02")):
            cert = ca.issue_cert("lb.quic.test")
            cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
            cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
            servers[name] = free_port()
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.quic_peers",
                    "serve",
                    name,
                    str(servers[name]),
                    str(tmp_path / f"{name}.pem"),
                    str(tmp_path / f"{name}.key"),
                    "--quic-lb-id",
                    lb_id,
                ],
                cwd=CHECKOUT,
                stdout=subprocess.PIPE,
                text=True,
            )
            processes.append(process)
            assert process.stdout.readline().strip() == "listening"
        port = free_port()
        config = f"""
listeners:
  - name: h3
    transport: udp
    listen: "127.0.0.1:{port}"
    routes:
      - {{match: {{protocol: quic, sni: lb.quic.test}}, backend: h3}}
    default: reject
backends:
  h3:
    servers: [{{address: "127.0.0.1:{servers["one"]}", quic_lb_id: "01"}},
              {{address: "127.0.0.1:{servers["two"]}", quic_lb_id: "02"}}]
    quic_lb: {{config_rotation: 0, server_id_length: 1}}
"""
        bodies = []
        with Router(tmp_path, config) as router:
            for _ in range(2):  # round robin: one connection lands on each server
                # The new port comes with the new ID: the router knows neither.
                with RebindingForwarder(port, on_new_id=True) as nat:
                    bodies.append(
                        two_requests_across_a_move(
                            nat, "lb.quic.test", tmp_path / "ca.pem", new_id=True
                        )
                    )
            created = router.metric(
                "l4router_udp_sessions_created_total", listener="h3", protocol="quic"
            )
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
    assert sorted(bodies) == [("one /one", "one /two"), ("two /one", "two /two")]
    assert created == 4  # each connection: its first session, and the one QUIC-LB started
