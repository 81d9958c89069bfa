"""Operating the real router: limits, ordered shutdown, hot reload, status page, --uid."""

import os
import pathlib
import pwd
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.support import (
    TWISTD,
    Backend,
    Router,
    ask,
    children_of,
    free_port,
    listening,
    pseudo_random_stream,
    reply_with_name,
    started_daemon,
    stream_digest,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)
ARTIFACTS = pathlib.Path(__file__).parent / "artifacts"


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_max_connections_admits_exactly_50_of_200_and_frees_every_fd(tmp_path):
    release = threading.Event()

    def hold_until_released(backend, connection):
        connection.recv(100)
        release.wait(30)
        connection.sendall(b"done")

    with Backend("held", hold_until_released) as backend, _released_at_exit(release):
        port = free_port()
        config = f"""
listeners:
  - name: capped
    listen: "127.0.0.1:{port}"
    max_connections: 50
    relay: copy  # descriptors exactly back to before (splice keeps a pooled pipe: see its test)
    default: held
backends:
  held: {{servers: ["127.0.0.1:{backend.port}"]}}
"""
        with Router(tmp_path, config) as router:
            fds_before = open_fds(router.process.pid)
            clients = []
            for index in range(200):
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                client.sendall(b"hello %d" % index)
                clients.append(client)
            wait_until(lambda: backend.connections == 50, message="50 relays")
            time.sleep(0.3)
            refused_at = time.monotonic()
            closed_at_once = 0
            for client in clients:
                client.settimeout(0.05)
                try:
                    closed_at_once += client.recv(10) == b""
                except ConnectionResetError:  # closed with our "hello" unread: a reset
                    closed_at_once += 1
                except socket.timeout:
                    pass  # admitted: still waiting for its backend
            assert closed_at_once == 150 and backend.connections == 50
            assert time.monotonic() - refused_at < 5
            release.set()
            replies = 0
            for client in clients:
                client.settimeout(5)
                try:
                    replies += client.recv(10) == b"done"
                except (socket.timeout, ConnectionResetError):
                    pass
                client.close()
            assert replies == 50
            assert (
                router.metric(
                    "l4router_connections_rejected_total",
                    listener="capped",
                    reason="limit_listener",
                )
                == 150
            )
            wait_until(
                lambda: open_fds(router.process.pid) <= fds_before,
                timeout=10,
                message="file descriptors back to the count before",
            )
            refusal_logs = [
                e
                for e in router.events()
                if e.get("reason") == "limit_listener" and "refused" in e.get("log_format", "")
            ]
            assert 1 <= len(refusal_logs) <= 2  # rate-limited, not one line per refusal


class _released_at_exit:
    def __init__(self, event):
        self.event = event

    def __enter__(self):
        return self.event

    def __exit__(self, *exc_info):
        self.event.set()


STREAM = 64 * 1024 * 1024


def paced_reader(port, results, index, seconds):
    """Reads a 64 MiB stream at a pace that takes about `seconds`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            client.sendall(b"GO %d" % index)
            chunks = 64
            results[index] = read_paced(client, STREAM // chunks, seconds / chunks)
    except OSError as exc:
        results[index] = exc


def read_paced(client, chunk_size, pause):
    import hashlib

    digest, count, goal = hashlib.sha256(), 0, chunk_size
    while True:
        data = client.recv(1 << 20)
        if not data:
            return digest.hexdigest(), count
        digest.update(data)
        count += len(data)
        if count >= goal:
            time.sleep(pause)
            goal += chunk_size


def stream_out(backend, connection):
    index = int(connection.recv(100).split()[1])
    for block in pseudo_random_stream(index, STREAM):
        connection.sendall(block)


def streaming_config(port, backend_port, shutdown_timeout):
    return f"""
listeners:
  - name: bulk
    listen: "127.0.0.1:{port}"
    default: source
backends:
  source: {{servers: ["127.0.0.1:{backend_port}"]}}
shutdown_timeout: {shutdown_timeout}
"""


def test_sigterm_drains_relays_in_order_and_exits_0(tmp_path):
    with Backend("source", stream_out) as backend:
        port = free_port()
        with Router(tmp_path, streaming_config(port, backend.port, "20s")) as router:
            results = {}
            readers = [
                threading.Thread(daemon=True, target=paced_reader, args=(port, results, i, 2.0))
                for i in range(20)
            ]
            for reader in readers:
                reader.start()
            wait_until(lambda: backend.connections == 20, message="20 relays")
            time.sleep(0.3)
            router.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            readyz = wait_until(
                lambda: router.error_status("/readyz"), message="/readyz while draining"
            )
            assert readyz == 503
            assert b"l4router_connections_active" in router.get("/metrics")
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2)
            for reader in readers:
                reader.join(60)
            code = router.process.wait(30)
    assert code == 0, router.log_text()
    assert time.monotonic() - signalled < 20
    for index in range(20):
        assert results[index] == (stream_digest(index, STREAM), STREAM), index
    messages = [e.get("log_format", "") for e in router.events()]
    order = [
        m
        for m in messages
        if m.startswith(
            (
                "Stopping",
                "Listener {listener} draining",
                "Listener {listener}: all",
                "l4router stopped",
            )
        )
    ]
    assert order == [
        "Stopping {stage}",
        "Listener {listener} draining {count} connections (at most {timeout}s)",
        "Listener {listener}: all connections done",
        "Stopping {stage}",
        "Stopping {stage}",
        "l4router stopped",
    ], order
    stages = [e["stage"] for e in router.events() if e.get("log_format") == "Stopping {stage}"]
    assert stages == ["ListenersService", "BackendsService", "AdminService"]


def test_a_stream_longer_than_shutdown_timeout_is_aborted_at_the_timeout(tmp_path):
    with Backend("source", stream_out) as backend:
        port = free_port()
        with Router(tmp_path, streaming_config(port, backend.port, "1s")) as router:
            results = {}
            reader = started_daemon(paced_reader, port, results, 0, 30.0)
            wait_until(lambda: backend.connections == 1, message="the relay")
            time.sleep(0.3)
            router.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = router.process.wait(30)
            stopped_after = time.monotonic() - signalled
            reader.join(60)
    assert code == 0
    assert 1.0 <= stopped_after < 3.0
    assert isinstance(results[0], OSError) or results[0][1] < STREAM
    event = [e for e in router.events() if e.get("log_namespace") == "l4router.access"][0]
    assert event["reason"] == "shutdown"
    assert any("aborting" in e.get("log_format", "") for e in router.events())


RELOAD_CONFIG = """
listeners:
  - name: front
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 200ms}}
    routes:
      - match: {{protocol: http1}}
        backend: {target}
    default: {target}
backends:
  old: {{servers: ["127.0.0.1:{old}"]}}
  new: {{servers: ["127.0.0.1:{new}"]}}
"""


def test_sighup_reload_switches_routes_without_refusing_or_breaking_anything(tmp_path):
    def echo_forever(backend, connection):
        while data := connection.recv(65536):
            connection.sendall(backend.name.encode() + b":" + data)

    with (
        Backend("old", reply_with_name) as old,
        Backend("new", reply_with_name) as new,
        Backend("long", echo_forever) as long_lived,
    ):
        port = free_port()
        text = RELOAD_CONFIG.format(port=port, old=old.port, new=new.port, target="old")
        text += f"  long: {{servers: ['127.0.0.1:{long_lived.port}']}}\n"
        with Router(tmp_path, text) as router:
            established = socket.create_connection(("127.0.0.1", port), timeout=5)
            results = []
            stop = threading.Event()

            def steady():
                while not stop.is_set():
                    try:
                        results.append((time.monotonic(), ask(port, b"GET / HTTP/1.1\r\n\r\n")))
                    except OSError as exc:
                        results.append((time.monotonic(), exc))

            loader = threading.Thread(daemon=True, target=steady)
            loader.start()
            try:
                # The established relay goes to `old` (http1 route).
                established.sendall(b"GET /long HTTP/1.1\r\n\r\n")
                assert established.recv(100).startswith(b"old:")
                time.sleep(0.3)
                router.config_path.write_text(
                    router.config_path.read_text()
                    .replace("backend: old", "backend: new")
                    .replace("default: old", "default: new")
                )
                router.process.send_signal(signal.SIGHUP)
                reloaded_at = time.monotonic()
                wait_until(
                    lambda: router.metric("l4router_config_reloads_total", result="success") == 1,
                    message="the reload",
                )
                time.sleep(0.5)
                # An invalid config on SIGHUP changes nothing and says so.
                good = router.config_path.read_text()
                router.config_path.write_text(
                    good.replace("idle_timeout", "x").replace(
                        "detect: {timeout: 200ms}", "detect: {timeout: soon}"
                    )
                )
                router.process.send_signal(signal.SIGHUP)
                wait_until(
                    lambda: router.metric("l4router_config_reloads_total", result="failure") == 1,
                    message="the failed reload",
                )
                assert router.metric("l4router_config_last_reload_success") == 0
                time.sleep(0.3)
            finally:
                stop.set()
                loader.join(10)
            established.close()
            errors = [
                e for e in router.events() if e.get("log_format", "").startswith("Reload failed")
            ]
    assert all(isinstance(r, bytes) and r for _, r in results), [
        r for _, r in results if not isinstance(r, bytes) or not r
    ][:3]
    before = [r for t, r in results if t < reloaded_at - 0.05]
    after = [r for t, r in results if t > reloaded_at + 0.3]
    assert before and all(r.startswith(b"old:") for r in before)
    assert after and all(r.startswith(b"new:") for r in after)
    assert len(errors) == 1 and "listeners[0].detect.timeout" in errors[0]["error"]


def test_status_page_in_headless_chromium(tmp_path):
    chromium = "/usr/bin/chromium"
    assert os.path.exists(chromium), "chromium missing: apt-get install chromium"
    with Backend("app", reply_with_name) as app:
        port, spare_port = free_port(), free_port()
        config = f"""
listeners:
  - name: public_edge
    listen: "127.0.0.1:{port}"
    routes:
      - name: to_app
        match: {{protocol: http1}}
        backend: app_servers
    default: reject
backends:
  app_servers: {{servers: ["127.0.0.1:{app.port}", "127.0.0.1:{spare_port}"]}}
  tenants: {{server_from: "{{sni}}:443", allow: ["*.tenants.test"]}}
"""
        with Router(tmp_path, config) as router:
            assert (
                router.post(f"/backends/app_servers/servers/127.0.0.1:{spare_port}/drain")[0] == 200
            )
            assert ask(port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"app:")
            url = f"http://127.0.0.1:{router.admin_port}/"
            flags = [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}",
            ]
            dom = subprocess.run(
                [chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60
            ).stdout
            ARTIFACTS.mkdir(exist_ok=True)
            screenshot = ARTIFACTS / "status_page.png"
            subprocess.run(
                [chromium, *flags, f"--screenshot={screenshot}", "--window-size=1280,900", url],
                capture_output=True,
                timeout=60,
            )
    for text in (
        "public_edge",
        f"127.0.0.1:{port}",
        "to_app",
        "app_servers",
        f"127.0.0.1:{app.port}",
        "completed",
        ">up<",
        ">state<",
        ">enabled<",
        ">draining<",
        "named by the client: {sni}:443",
    ):
        assert text in dom, text
    assert screenshot.stat().st_size > 10000


def test_uid_nobody_binds_a_low_port_as_root_then_drops_privileges(tmp_path):
    assert os.geteuid() == 0, "this test checks privilege dropping and needs root"
    nobody = pwd.getpwnam("nobody")
    port = next(p for p in range(1000, 1024) if _free(p))
    tmp_path.chmod(0o755)
    config = tmp_path / "low.yaml"
    # One process: workers would be started by nobody, who cannot run this machine's Python
    # (it lives under /root); they get their own tests.
    config.write_text(
        f"listeners: [{{name: low, listen: '127.0.0.1:{port}', default: reject}}]\nworkers: 1\n"
    )
    config.chmod(0o644)
    process = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "--uid",
            str(nobody.pw_uid),
            "--gid",
            str(nobody.pw_gid),
            "l4router",
            "-c",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        wait_until(lambda: not _free(port), message="the low port to be bound")
        # Bound as root, then twistd sheds its privileges: every uid becomes nobody's (the
        # port is bound a moment before that, so the uids are watched, not read once).
        wait_until(
            lambda: _uids(process.pid) == {nobody.pw_uid}, message="the uids to become nobody's"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"\x00junk")
            assert client.recv(10) == b""  # served (rejected by route) as nobody
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output


def _uids(pid):
    """The real, effective, saved and filesystem uids of a process."""
    with open(f"/proc/{pid}/status") as status:
        return set(map(int, next(line for line in status if line.startswith("Uid:")).split()[1:]))


def _free(port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activation_and_log_level(tmp_path, workers):
    """systemd-socket-activate hands a bound socket to twistd; the `systemd:` endpoint adopts
    it (with workers, every worker accepts from it). logging.level: warn keeps the
    per-connection info events out of the log."""
    activate = "/usr/bin/systemd-socket-activate"
    assert os.path.exists(activate), "systemd-socket-activate missing: apt-get install systemd"
    with Backend("app", reply_with_name) as app:
        port = free_port()
        admin = free_port()
        config = tmp_path / "activated.yaml"
        config.write_text(f"""
listeners:
  - name: activated
    listen: "systemd:domain=INET:index=0"
    default: app
backends:
  app: {{servers: ["127.0.0.1:{app.port}"]}}
admin: {{listen: "127.0.0.1:{admin}"}}
logging: {{level: warn}}
workers: {workers}
""")
        log = tmp_path / "activated.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                # --fdname sets LISTEN_FDNAMES as systemd 227+ does; Twisted requires it.
                [
                    activate,
                    "-l",
                    f"127.0.0.1:{port}",
                    "--fdname=edge",
                    TWISTD,
                    "-n",
                    "--pidfile=",
                    "l4router",
                    "-c",
                    str(config),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
            try:
                # The socket is systemd's: it accepts before l4router even runs.
                wait_until(lambda: listening(port), message="systemd-socket-activate")
                assert ask(port, b"GET / HTTP/1.1\r\n\r\n", timeout=20).startswith(b"app:")
                wait_until(lambda: _ready(admin), message="the admin site ready")
                answers = {ask(port, b"GET / HTTP/1.1\r\n\r\n", timeout=20) for _ in range(20)}
                # Each worker accepts from the socket systemd passed: with the others stopped,
                # it alone answers.
                workers_answering = []
                pids = children_of(children_of(process.pid)[0]) if workers > 1 else []
                for alone in pids:
                    others = [pid for pid in pids if pid != alone]
                    for other in others:
                        os.kill(other, signal.SIGSTOP)
                    try:
                        workers_answering.append(ask(port, b"GET / HTTP/1.1\r\n\r\n", timeout=20))
                    finally:
                        for other in others:
                            os.kill(other, signal.SIGCONT)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    text = log.read_text()
    assert process.returncode == 0, text
    assert "accepting on" not in text and "l4router.access" not in text  # info: filtered
    assert answers == {b"app:GET / HTTP/1.1"}
    assert workers_answering == [b"app:GET / HTTP/1.1"] * (workers if workers > 1 else 0)


def _ready(admin):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2).status == 200
    except OSError:
        return False
