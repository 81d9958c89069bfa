"""What only the zero-copy relay (`relay: splice`) needs tested beyond the relay tests it shares
with the copying relay in test_e2e_tcp.py: its own idle watch and shutdown abort."""

import signal
import socket
import time

import pytest

from l4router import splice
from tests.support import Backend, Router, free_port, wait_until
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
        config = splice_config(port, backend.port, extra="idle_timeout: 1s") + \
            "shutdown_timeout: 300ms\n"  # shorter than idle_timeout: the drain aborts first
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
