"""The zero-copy relay (`relay: splice`) passes the copying relay's tests through the real
router: byte-exact bulk both ways, half-close, backpressure, idle timeout, shutdown."""

import hashlib
import signal
import socket
import threading
import time

import pytest

from l4router import splice
from tests.support import (
    Backend, Router, free_port, pseudo_random_stream, read_to_end, send_stream, stream_digest,
    wait_until)
from tests.test_e2e_tcp import relay_config

pytestmark = pytest.mark.timeout(180)


def test_splice_is_available_here():
    assert splice.AVAILABLE, "os.splice (Linux, Python 3.10+) is what relay: splice runs on"
SIZE = 256 * 1024 * 1024


def splice_config(port, backend_port, extra=""):
    return relay_config(port, backend_port, extra="relay: splice\n    " + extra)


def test_256_mib_each_way_byte_exact_with_splice(tmp_path):
    def exchange(backend, connection):
        sender = threading.Thread(target=send_stream, args=(connection, 2, SIZE))
        sender.start()
        backend.record(read_to_end(connection))
        sender.join()
        connection.shutdown(socket.SHUT_WR)

    with Backend("sink", exchange) as backend:
        port = free_port()
        with Router(tmp_path, splice_config(port, backend.port)) as router:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                client.sendall(b"BULK")
                result = {}
                reader = threading.Thread(target=lambda: result.update(down=read_to_end(client)))
                reader.start()
                send_stream(client, 1, SIZE)
                client.shutdown(socket.SHUT_WR)
                reader.join(120)
            assert result["down"] == (stream_digest(2, SIZE), SIZE)
            wait_until(lambda: backend.results, message="the backend's digest")
            assert backend.results[0] == (_digest_with_prefix(b"BULK", 1), SIZE + 4)
            event = router.wait_access_events(1)[0]
            assert event["bytes_up"] == SIZE + 4 and event["bytes_down"] == SIZE
            assert event["reason"] == "completed"


def _digest_with_prefix(prefix, seed):
    digest = hashlib.sha256(prefix)
    for block in pseudo_random_stream(seed, SIZE):
        digest.update(block)
    return digest.hexdigest()


def test_half_close_with_splice(tmp_path):
    def answer_after_eof(backend, connection):
        backend.record(read_to_end(connection))
        send_stream(connection, 7, 8 * 1024 * 1024)
        connection.shutdown(socket.SHUT_WR)

    with Backend("sink", answer_after_eof) as backend:
        port = free_port()
        with Router(tmp_path, splice_config(port, backend.port)):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                client.sendall(b"GET /report HTTP/1.1\r\nHost: x\r\n\r\n")
                client.shutdown(socket.SHUT_WR)
                assert read_to_end(client) == (stream_digest(7, 8 * 1024 * 1024),
                                               8 * 1024 * 1024)


def test_backpressure_with_splice(tmp_path):
    big = 512 * 1024 * 1024
    sent = []

    def flood(backend, connection):
        connection.recv(16)
        for block in pseudo_random_stream(3, big):
            connection.sendall(block)
            sent.append(len(block))
        connection.shutdown(socket.SHUT_WR)

    with Backend("flood", flood) as backend:
        port = free_port()
        with Router(tmp_path, splice_config(port, backend.port)) as router:
            before = router.rss_bytes()
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                client.sendall(b"START")
                wait_until(lambda: sum(sent) > 1024 * 1024, message="the flood to start")
                time.sleep(2)
                assert sum(sent) < 64 * 1024 * 1024, "the backend was never paused"
                assert router.rss_bytes() - before < 64 * 1024 * 1024
                assert read_to_end(client) == (stream_digest(3, big), big)


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
