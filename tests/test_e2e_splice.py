"""What only the zero-copy relay (`relay: splice`) needs tested beyond the relay tests it shares
with the copying relay in test_e2e_tcp.py: its own idle watch and shutdown abort, and pipes
borrowed only while bytes are in flight."""

import os
import resource
import signal
import socket
import threading
import time

import pytest

from l4router.connection import splice
from tests.support import (
    Backend,
    Router,
    free_port,
    pseudo_random_stream,
    read_to_end,
    stream_digest,
    wait_until,
)
from tests.test_e2e_tcp import relay_config

pytestmark = pytest.mark.timeout(180)


def test_splice_is_available_here():
    assert splice.AVAILABLE, "os.splice (Linux, Python 3.10+) is what relay: splice runs on"


def splice_config(port, backend_port, extra=""):
    return relay_config(port, backend_port, extra="relay: splice\n    " + extra)


def test_idle_timeout_and_shutdown_abort_with_splice(tmp_path):
    def hold(backend, connection):
        connection.recv(100)
        time.sleep(10)

    with Backend("hold", hold) as backend:
        port = free_port()
        config = (
            splice_config(port, backend.port, extra="idle_timeout: 1s")
            + "shutdown_timeout: 300ms\n"
        )  # shorter than idle_timeout: the drain aborts first
        with Router(tmp_path, config) as router:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
                idle.sendall(b"\xffIDLE")  # decided at once: unknown -> default
                started = time.monotonic()
                try:
                    assert idle.recv(10) == b""
                except ConnectionResetError:
                    pass
                assert 1.0 <= time.monotonic() - started < 2.5
            held = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.sendall(b"\xffHOLD")
            wait_until(lambda: backend.connections == 2, message="the second relay")
            router.process.send_signal(signal.SIGTERM)
            assert router.process.wait(15) == 0
            held.close()
            reasons = [e["reason"] for e in router.access_events()]
    assert reasons == ["idle_timeout", "shutdown"]


def _sleep_then(seconds, function):
    time.sleep(seconds)
    return function()


def test_idle_relays_hold_no_pipes_and_busy_ones_copy_when_descriptors_run_out(tmp_path):
    def echo(backend, connection):
        while data := connection.recv(65536):
            connection.sendall(data)

    size = 4 << 20
    with Backend("echo", echo) as backend:
        port = free_port()
        with Router(tmp_path, splice_config(port, backend.port)) as router:
            pid = router.process.pid
            # The least of a few looks: a file the router reads now and then (its own /proc
            # for the process gauges) must not count as one of its relays' descriptors.
            before = min(
                _sleep_then(0.05, lambda: len(os.listdir(f"/proc/{pid}/fd"))) for _ in range(5)
            )
            clients = []
            for _ in range(10):
                client = socket.create_connection(("127.0.0.1", port), timeout=30)
                client.sendall(b"\xffhello")
                assert client.recv(100) == b"\xffhello"
                clients.append(client)
            # Ten idle relays: two sockets each, no pipe (a short flow is copied; a direction
            # splices only once it shows bulk: SPLICE_AFTER bytes and a large read).
            wait_until(
                lambda: len(os.listdir(f"/proc/{pid}/fd")) - before == 20,
                message="two descriptors per idle relay",
            )
            # Not one descriptor more: twenty directions share the pooled pipe; the others copy.
            held = len(os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (held, held))
            results = [None] * 10

            def stream(index, client):
                def send():
                    for chunk in pseudo_random_stream(index, size):
                        client.sendall(chunk)
                    client.shutdown(socket.SHUT_WR)

                sender = threading.Thread(daemon=True, target=send)
                sender.start()
                time.sleep(1.0)  # not reading yet: every direction fills up and holds on
                results[index] = read_to_end(client)
                sender.join()

            threads = [
                threading.Thread(daemon=True, target=stream, args=(i, c))
                for i, c in enumerate(clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            for client in clients:
                client.close()
    for index, result in enumerate(results):
        assert result == (stream_digest(index, size), size), index
