"""Runtime control of backend servers: l4router-ctl and the admin site against the real
router (one process and two workers), real TCP servers and real relays."""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.support import (
    Backend,
    Router,
    free_port,
    pseudo_random_stream,
    read_to_end,
    stream_digest,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)
BIG = 64 << 20
CTL = shutil.which("l4router-ctl")


def name_then_echo(backend, connection):
    """Says which server it is (a line), then echoes everything until EOF."""
    connection.sendall(backend.name.encode() + b"\n")
    while data := connection.recv(1 << 20):
        connection.sendall(data)


def config_for(port, *servers, extra=""):
    listed = ", ".join(f'"127.0.0.1:{s.port}"' for s in servers)
    return f"""
listeners:
  - name: front
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 100ms}}
    default: app
backends:
  app: {{servers: [{listed}], balance: round_robin}}
{extra}"""


def ctl(router, *args):
    """Run l4router-ctl against `router`; (exit status, stdout + stderr)."""
    assert CTL, "l4router-ctl is not on PATH: install l4router (see README)"
    done = subprocess.run(
        [CTL, "--admin", f"http://127.0.0.1:{router.admin_port}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, L4ROUTER_TOKEN=Router.TOKEN),
    )
    return done.returncode, done.stdout + done.stderr


def server_of(port):
    """Connect, read the server's name line, close: which server got this client."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"x")
        seen = b""
        while b"\n" not in seen:
            chunk = client.recv(64)
            if not chunk:
                raise ConnectionError(f"closed after {seen!r}")
            seen += chunk
        return seen.split(b"\n")[0].decode()


class LongRelay:
    """A relay that echoes `size` pseudo-random bytes through the router; its server is the
    first line. Opened until it lands on `wanted` (round robin: within a few tries)."""

    def __init__(self, port, wanted, size=BIG, seed=11, pause=0.01):
        self.size, self.seed, self.pause = size, seed, pause
        for _ in range(20):
            client = socket.create_connection(("127.0.0.1", port), timeout=60)
            client.sendall(b"s")
            seen = b""
            while not seen.endswith(b"\ns"):  # the server's name, then the echoed "s"
                seen += client.recv(1)
            if seen[:-2].decode() == wanted:
                break
            client.close()
        else:
            raise AssertionError(f"no relay reached {wanted}")
        self.client = client
        self.result = None

    def run(self):
        """Send in one thread, read in another; (digest, count) of what came back."""
        sender = threading.Thread(target=self._send, daemon=True)
        sender.start()
        try:
            self.result = read_to_end(self.client)
        except OSError as exc:
            self.result = exc
        sender.join(60)
        self.client.close()

    def _send(self):
        try:
            for chunk in pseudo_random_stream(self.seed, self.size):
                self.client.sendall(chunk)
                time.sleep(self.pause)  # a relay that lasts a while
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class SteadyClients:
    """Clients one after another in a thread, each noting when it ended and which server
    answered (or the error): `seen`, a list of (monotonic time, name or exception)."""

    def __init__(self, port):
        self.port = port
        self.seen = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                self.seen.append((time.monotonic(), server_of(self.port)))
            except OSError as exc:
                self.seen.append((time.monotonic(), exc))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(30)

    def latest(self, count=5):
        return {name for _, name in self.seen[-count:]}

    def failures(self):
        return [result for _, result in self.seen if not isinstance(result, str)]


def test_draining_moves_every_new_client_and_lets_its_relay_finish_with_two_workers(tmp_path):
    with Backend("a", name_then_echo) as a, Backend("b", name_then_echo) as b:
        port = free_port()
        with Router(tmp_path, config_for(port, a, b), workers=2) as router:
            relay = LongRelay(port, "a", pause=0.05)  # 3 s or more: it outlasts the drain
            relaying = threading.Thread(target=relay.run, daemon=True)
            relaying.start()
            with SteadyClients(port) as clients:
                time.sleep(0.5)
                code, output = ctl(router, "drain", "app", f"127.0.0.1:{a.port}")
                drained_at = time.monotonic()
                assert code == 0 and "draining" in output, output
                code, listing = ctl(router, "servers")
                time.sleep(1.0)
            # The relay on the drained server is still counted while it goes on.
            assert f"127.0.0.1:{a.port}" in listing and "draining" in listing, listing
            row = next(line for line in listing.splitlines() if f":{a.port}" in line)
            assert row.split()[-1] == "1", listing
            relaying.join(120)
            assert (
                router.metric(
                    "l4router_backend_server_admin_state",
                    backend="app",
                    server=f"127.0.0.1:{a.port}",
                    state="draining",
                )
                == 1
            )
            assert router.metric("l4router_runtime_changes_total", action="drain") == 1
            wait_until(
                lambda: _server_status(router, a.port)["active_connections"] == 0,
                message="the drained server's count to reach 0",
            )
    assert relay.result == (stream_digest(relay.seed, BIG), BIG)
    assert not clients.failures(), clients.failures()[:3]
    after = [r for t, r in clients.seen if t > drained_at]
    before = [r for t, r in clients.seen if t < drained_at - 0.1]
    assert len(after) > 20 and set(after) == {"b"}, after[:5]
    assert "a" in before
    assert any(
        e.get("log_format", "").startswith("Runtime change:") and e["action"] == "drain"
        for e in router.events()
    )


def _server_status(router, port):
    backends = json.loads(router.get("/status/backends"))
    servers = [s for b in backends for s in b["servers"]]
    return next(s for s in servers if s["server"] == f"127.0.0.1:{port}")


def test_disable_abort_enable_weight_add_and_remove(tmp_path):
    with (
        Backend("a", name_then_echo) as a,
        Backend("b", name_then_echo) as b,
        Backend("c", name_then_echo) as c,
    ):
        port = free_port()
        with Router(tmp_path, config_for(port, a, b)) as router:
            relay = LongRelay(port, "b", size=BIG)
            relaying = threading.Thread(target=relay.run, daemon=True)
            relaying.start()
            time.sleep(0.3)
            assert ctl(router, "disable", "app", f"127.0.0.1:{b.port}", "--abort")[0] == 0
            relaying.join(60)
            assert {server_of(port) for _ in range(6)} == {"a"}
            assert ctl(router, "enable", "app", f"127.0.0.1:{b.port}")[0] == 0
            assert ctl(router, "weight", "app", f"127.0.0.1:{a.port}", "3")[0] == 0
            picks = [server_of(port) for _ in range(40)]
            assert abs(picks.count("a") - 30) <= 1 and picks.count("b") + picks.count("a") == 40
            code, output = ctl(router, "add", "app", f"127.0.0.1:{c.port}", "--weight", "4")
            assert code == 0 and f"127.0.0.1:{c.port}" in output, output
            picks = [server_of(port) for _ in range(80)]
            for name, share in (("a", 30), ("b", 10), ("c", 40)):  # weights 3, 1, 4
                assert abs(picks.count(name) - share) <= 1, picks
            assert ctl(router, "remove", "app", f"127.0.0.1:{c.port}")[0] == 0
            assert "c" not in {server_of(port) for _ in range(10)}
            code, output = ctl(router, "drain", "app", "127.0.0.1:1")
            assert code == 1 and "has no server '127.0.0.1:1'" in output, output
            code, output = ctl(router, "weight", "app", f"127.0.0.1:{a.port}", "0")
            assert code == 1 and "weight must be 1..1000" in output, output
            # Without the token: refused, whatever the address it comes from.
            code, output = (
                subprocess.run(
                    [
                        CTL,
                        "--admin",
                        f"http://127.0.0.1:{router.admin_port}",
                        "drain",
                        "app",
                        f"127.0.0.1:{a.port}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={k: v for k, v in os.environ.items() if k != "L4ROUTER_TOKEN"},
                ).returncode,
                None,
            )
            assert code == 1
            assert _server_status(router, a.port)["state"] == "enabled"
            # Each change that was made counted once; the refused ones not at all.
            for action in ("disable", "enable", "weight", "add", "remove"):
                assert router.metric("l4router_runtime_changes_total", action=action) == 1
            assert router.metric("l4router_runtime_changes_total", action="drain") == 0
            aborted = [e for e in router.access_events() if e["reason"] == "server_disabled"]
    assert isinstance(relay.result, Exception) or relay.result[1] < BIG
    assert len(aborted) == 1 and aborted[0]["server"] == f"127.0.0.1:{b.port}"
    logged = {
        e["action"]
        for e in router.events()
        if e.get("log_format", "").startswith("Runtime change:")
    }
    assert logged == {"disable", "enable", "weight", "add", "remove"}


def test_changes_outlive_a_reload_and_with_a_state_file_a_restart(tmp_path):
    with (
        Backend("a", name_then_echo) as a,
        Backend("b", name_then_echo) as b,
        Backend("c", name_then_echo) as c,
    ):
        port = free_port()
        state_file = tmp_path / "state.json"
        extra = f"state_file: {state_file}\n"
        router = Router(tmp_path, config_for(port, a, b, c, extra=extra), workers=2)
        with router:
            assert ctl(router, "drain", "app", f"127.0.0.1:{a.port}")[0] == 0
            assert ctl(router, "weight", "app", f"127.0.0.1:{c.port}", "7")[0] == 0
            # Reloaded without c: a stays drained, c's change is forgotten.
            router.config_path.write_text(
                router.config_path.read_text().replace(f', "127.0.0.1:{c.port}"', "")
            )
            router.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda: router.metric("l4router_config_reloads_total", result="success") == 1,
                message="the reload",
            )
            wait_until(
                lambda: {server_of(port) for _ in range(10)} == {"b"},
                message="only b after the reload",
            )
            assert _server_status(router, a.port)["state"] == "draining"
        saved = json.loads(state_file.read_text())
        assert saved["servers"]["app"] == {f"127.0.0.1:{a.port}": {"state": "draining"}}
        with Router(
            tmp_path, router.config_path.read_text().split("\nadmin:")[0], workers=2
        ) as again:
            assert _server_status(again, a.port)["state"] == "draining"
            assert {server_of(port) for _ in range(10)} == {"b"}
