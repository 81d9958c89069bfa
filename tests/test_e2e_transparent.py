"""Transparent mode in network namespaces the test creates: a client, the router and a server
each in their own, the server routed back through the router. The server must see the
client's own address, not the router's."""

import json
import os
import secrets
import subprocess
import sys
import time

import pytest
from twisted.logger import eventsFromJSONLogFile

from tests.support import RECORD_SEPARATOR, TWISTD, wait_until

pytestmark = pytest.mark.timeout(120)

SERVER = """
import socket, sys
listener = socket.create_server(("10.77.2.2", 7000))
print("listening", flush=True)
while True:
    connection, peer = listener.accept()
    data = connection.recv(100)
    connection.sendall(f"{peer[0]} sent {data.decode()}".encode())
    connection.close()
"""

CLIENT = """
import socket
with socket.create_connection(("10.77.1.1", 4443), timeout=10) as client:
    client.sendall(b"hello")
    print(client.recv(200).decode())
"""


def run(*command, namespace=None):
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespaces():
    """Client (10.77.1.2) -- router (10.77.1.1 | 10.77.2.1) -- server (10.77.2.2). The router
    delivers locally what the server sends back to client addresses (the README's rules)."""
    assert os.geteuid() == 0, "network namespaces need root"
    tag = secrets.token_hex(3)
    client, router, server = f"l4c{tag}", f"l4r{tag}", f"l4s{tag}"
    created = []
    try:
        for namespace in (client, router, server):
            run("ip", "netns", "add", namespace)
            created.append(namespace)
            run("ip", "link", "set", "lo", "up", namespace=namespace)
        run("ip", "link", "add", f"c{tag}", "type", "veth", "peer", "name", f"rc{tag}")
        run("ip", "link", "add", f"s{tag}", "type", "veth", "peer", "name", f"rs{tag}")
        for link, namespace in (
            (f"c{tag}", client),
            (f"rc{tag}", router),
            (f"rs{tag}", router),
            (f"s{tag}", server),
        ):
            run("ip", "link", "set", link, "netns", namespace)
            run("ip", "link", "set", link, "up", namespace=namespace)
        run("ip", "addr", "add", "10.77.1.2/24", "dev", f"c{tag}", namespace=client)
        run("ip", "route", "add", "default", "via", "10.77.1.1", namespace=client)
        run("ip", "addr", "add", "10.77.1.1/24", "dev", f"rc{tag}", namespace=router)
        run("ip", "addr", "add", "10.77.2.1/24", "dev", f"rs{tag}", namespace=router)
        run("ip", "addr", "add", "10.77.2.2/24", "dev", f"s{tag}", namespace=server)
        run("ip", "route", "add", "default", "via", "10.77.2.1", namespace=server)
        # What comes back from the servers for a client address is for this host's sockets.
        run(
            "ip",
            "rule",
            "add",
            "from",
            "10.77.2.0/24",
            "iif",
            f"rs{tag}",
            "lookup",
            "100",
            namespace=router,
        )
        run(
            "ip",
            "route",
            "add",
            "local",
            "10.77.1.0/24",
            "dev",
            "lo",
            "table",
            "100",
            namespace=router,
        )
        yield client, router, server
    finally:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=20)


def test_the_server_sees_the_clients_own_address(tmp_path, namespaces):
    client, router, server = namespaces
    config = tmp_path / "router.yaml"
    config.write_text("""
listeners:
  - {name: edge, listen: "10.77.1.1:4443", detect: {timeout: 200ms}, default: app}
backends:
  app: {servers: ["10.77.2.2:7000"], transparent: true}
admin: {listen: []}
logging: {format: json}
workers: 1
""")
    log_path = tmp_path / "router.log"
    server_process = subprocess.Popen(
        ["ip", "netns", "exec", server, sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    router_log = open(log_path, "wb")
    router_process = subprocess.Popen(
        ["ip", "netns", "exec", router, TWISTD, "-n", "--pidfile=", "l4router", "-c", str(config)],
        stdout=router_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        assert server_process.stdout.readline().strip() == "listening"
        wait_until(
            lambda: b'"address": "10.77.1.1:4443"' in log_path.read_bytes(),
            message="the router accepting",
        )
        answers = []
        for _ in range(3):
            answers.append(
                subprocess.run(
                    ["ip", "netns", "exec", client, sys.executable, "-c", CLIENT],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout.strip()
            )
            time.sleep(0.1)
    finally:
        router_process.terminate()
        router_process.wait(30)
        router_log.close()
        server_process.kill()
        server_process.wait(10)
    assert answers == ["10.77.1.2 sent hello"] * 3
    with open(log_path) as stream:
        events = list(eventsFromJSONLogFile(stream, recordSeparator=RECORD_SEPARATOR))
    access = [e for e in events if e.get("log_namespace") == "l4router.access"]
    assert [(e["source"], e["server"], e["reason"]) for e in access] == [
        ("10.77.1.2", "10.77.2.2:7000", "completed")
    ] * 3
    assert router_process.returncode == 0, json.dumps([e.get("log_format") for e in events])


def test_transparent_needs_cap_net_admin_and_says_so(tmp_path):
    config = tmp_path / "router.yaml"
    config.write_text("""
listeners: [{name: edge, listen: "127.0.0.1:1", default: app}]
backends: {app: {servers: ["127.0.0.1:2"], transparent: true}}
""")
    done = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-net_admin,-net_raw",
            TWISTD,
            "-n",
            "--pidfile=",
            "l4router",
            "-c",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "backends.app.transparent: IP_TRANSPARENT refused" in done.stderr
    assert "CAP_NET_ADMIN" in done.stderr
