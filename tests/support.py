"""End-to-end test support: the real `twistd -n l4router` process and real loopback servers."""

import contextlib
import hashlib
import os
import random
import resource
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import eventsFromJSONLogFile

RECORD_SEPARATOR = "\x1e"  # what twistd's JSON log puts before each record
TWISTD = shutil.which("twistd")
LOOPBACK = "127.0.0.1"


def free_port(host=LOOPBACK):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def started_daemon(target, *args):
    """A started daemon thread running target(*args): a test that fails before joining it
    does not keep the run alive (join it with a timeout where the test waits for it)."""
    thread = threading.Thread(daemon=True, target=target, args=args)
    thread.start()
    return thread


def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def listening(port, host=LOOPBACK):
    """Something accepts connections on host:port."""
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


class Router:
    """Runs `twistd -n l4router -c CONFIG` with JSON logs; stops it on exit, checking exit 0."""

    TOKEN = "admin-token-for-the-tests"

    def __init__(
        self,
        tmp_path,
        config_text,
        admin_port=None,
        env=None,
        workers=1,
        admin_extra="",
        max_open_files=None,
    ):
        """`admin_extra`: more keys of the admin section; `max_open_files`: RLIMIT_NOFILE."""
        assert TWISTD, "twistd is not on PATH: install l4router (see README)"
        self.tmp_path = tmp_path
        self.admin_port = admin_port or free_port()
        self.config_path = tmp_path / "router.yaml"
        self.config_path.write_text(
            config_text + f"\nadmin: {{listen: '127.0.0.1:{self.admin_port}', "
            f"token: {self.TOKEN}{admin_extra}}}\n"
            f"logging: {{format: json, access_log: true}}\nworkers: {workers}\n"
        )
        self.log_path = tmp_path / "router.log"
        self.env = env
        self.max_open_files = max_open_files
        self.workers = workers
        self.process = None

    def _limits(self):
        if self.max_open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files,) * 2)

    def start(self):
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "l4router", "-c", str(self.config_path)],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=self.tmp_path,
            env=self.env,
            preexec_fn=self._limits,
        )
        try:
            wait_until(self._ready, timeout=20, message="the router's /healthz")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self):
        if self.process.poll() is not None:
            raise AssertionError(f"router exited {self.process.returncode}:\n{self.log_text()}")
        try:
            # With workers, /readyz: every worker accepts (one killed while it still starts
            # would stop everything, as a broken install does).
            return self.get("/readyz" if self.workers > 1 else "/healthz") in (b"ok\n", b"ready\n")
        except OSError:
            return False

    def get(self, path):
        url = f"http://{LOOPBACK}:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()

    def post(self, path, headers=None, token=TOKEN, timeout=40):
        """(HTTP status, body) of a POST to the admin site, with the admin token unless
        `token` is None."""
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.admin_port}{path}", method="POST", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def error_status(self, path):
        """The HTTP error code `path` answers with; None while it answers 2xx or not at all."""
        try:
            self.get(path)
            return None
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def metrics(self):
        """{(sample name, frozenset of label items): value}."""
        samples = {}
        for family in text_string_to_metric_families(self.get("/metrics").decode()):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def metric(self, name, **labels):
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def log_text(self):
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def events(self):
        """The router's JSON log events. Records are read by their separator: a line another
        program writes to the same file (grpcio's at-fork handler in the child, before exec,
        says so on stderr now and then) is skipped, instead of making the reader take the
        whole file for newline-separated JSON and find no event at all."""
        with open(self.log_path) as stream:
            return list(eventsFromJSONLogFile(stream, recordSeparator=RECORD_SEPARATOR))

    def access_events(self):
        return [e for e in self.events() if e.get("log_namespace") == "l4router.access"]

    def wait_access_events(self, count, timeout=10):
        return wait_until(
            lambda: len(self.access_events()) >= count and self.access_events(),
            timeout=timeout,
            message=f"{count} access-log events",
        )

    def rss_bytes(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self):
        """SIGTERM (unless it has exited already) and the exit code; never leaves it running."""
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    raise AssertionError("router did not stop within 60s of SIGTERM")
            return self.process.returncode
        finally:
            self.log_file.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        code = self.stop()
        if exc_info[0] is None:
            assert code == 0, f"router exited {code}:\n{self.log_text()}"


def run_twistd(*args, cwd=None, timeout=30, env=None):
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "l4router", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


class Backend(socketserver.ThreadingTCPServer):
    """A loopback TCP server running `handler(backend, socket)` per connection in a thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # socketserver's default of 5 drops SYNs when 200 clients arrive

    def __init__(self, name, handler, host=LOOPBACK, port=0):
        self.name = name
        self.handle_connection = handler
        self.connections = 0
        self.results = []
        self.lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.shutdown()
        self.server_close()

    def record(self, result):
        with self.lock:
            self.results.append(result)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        with self.server.lock:
            self.server.connections += 1
        self.request.settimeout(60)
        try:
            self.server.handle_connection(self.server, self.request)
        except OSError:
            pass


def reply_with_name(backend, connection):
    """Reads the first chunk, answers `name:` and the first line it saw, closes."""
    data = connection.recv(65536)
    backend.record(data)
    connection.sendall(backend.name.encode() + b":" + data.split(b"\r\n", 1)[0])


def ask(port, payload=b"ping", source=None, host=LOOPBACK, timeout=10):
    """Connect (from `source` if given), send `payload`, return everything until EOF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        if source:
            client.bind((source, 0))
        client.connect((host, port))
        client.sendall(payload)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
        return reply


def http_reply_with_name(backend, connection):
    """A minimal HTTP/1 server: answers 200 with `name path` and closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return
        data += chunk
    backend.record(data)
    path = data.split(b" ", 2)[1]
    body = backend.name.encode() + b" " + path
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


def pseudo_random_stream(seed, size, chunk=1 << 20):
    """Deterministic random bytes in chunks, and their sha256 is `stream_digest(seed, size)`."""
    generator = random.Random(seed)
    sent = 0
    while sent < size:
        block = generator.randbytes(min(chunk, size - sent))
        sent += len(block)
        yield block


def stream_digest(seed, size):
    digest = hashlib.sha256()
    for block in pseudo_random_stream(seed, size):
        digest.update(block)
    return digest.hexdigest()


def read_to_end(connection, limit=None):
    """(sha256 hex, byte count) of everything read until EOF."""
    digest = hashlib.sha256()
    count = 0
    while True:
        chunk = connection.recv(1 << 20)
        if not chunk:
            return digest.hexdigest(), count
        digest.update(chunk)
        count += len(chunk)
        if limit is not None and count > limit:
            raise AssertionError(f"read more than {limit} bytes")


def send_stream(connection, seed, size):
    for block in pseudo_random_stream(seed, size):
        connection.sendall(block)


def parent_of(pid):
    """The parent process of `pid` (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def children_of(pid):
    """The processes whose parent is `pid`: a supervisor's fork server, its workers."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if parent_of(int(entry)) == pid:
                    found.append(int(entry))
            except (OSError, ValueError):
                continue
    return sorted(found)


@contextlib.contextmanager
def running_nginx(prefix, config_text, ports):
    """A real nginx run with `config_text` (written into `prefix`, its working folder) until
    the block ends; it has started once every port of `ports` listens."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(binary), "nginx missing: apt-get install nginx"
    (prefix / "nginx.conf").write_text(config_text)
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stderr=subprocess.PIPE
    )
    try:
        wait_until(lambda: all(listening(port) for port in ports), message="nginx to listen")
        yield process
    finally:
        process.terminate()
        process.wait(10)
