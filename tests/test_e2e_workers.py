"""`workers: N`: the real supervising twistd and its worker processes on loopback."""

import collections
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.support import (
    TWISTD,
    Backend,
    Router,
    free_port,
    parent_of,
    pseudo_random_stream,
    read_to_end,
    reply_with_name,
    run_twistd,
    stream_digest,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)
STREAM = 8 << 20


def echo(backend, connection):
    while data := connection.recv(65536):
        connection.sendall(data)


def stream_config(port, backend_port, extra=""):
    return f"""
listeners:
  - name: front
    listen: "127.0.0.1:{port}"
    detect: {{timeout: 200ms}}
    default: app
backends:
  app: {{servers: ["127.0.0.1:{backend_port}"]}}
{extra}"""


def worker_pids(router):
    """{worker index: pid} of the newest start of each worker, from the supervisor's log."""
    pids = {}
    for event in router.events():
        if event.get("log_format") == "Worker {index} started (pid {pid})":
            pids[event["index"]] = event["pid"]
    return pids


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def relay_digest(port, seed, size):
    """Send `size` pseudo-random bytes through an echo relay; the digest of what came back.
    From 127.0.0.(seed+1): workers are chosen by the source address."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=20, source_address=(f"127.0.0.{seed % 250 + 1}", 0)
    ) as client:
        sender = threading.Thread(daemon=True, target=_send_all, args=(client, seed, size))
        sender.start()
        digest, count = read_to_end(client)
        sender.join()
    return digest, count


def _send_all(client, seed, size):
    for chunk in pseudo_random_stream(seed, size):
        client.sendall(chunk)
    client.shutdown(socket.SHUT_WR)


def test_connections_spread_over_both_workers_byte_exact_and_counted_once(tmp_path):
    with Backend("echo", echo) as backend:
        port = free_port()
        with Router(tmp_path, stream_config(port, backend.port), workers=2) as router:
            pids = worker_pids(router)
            assert sorted(pids) == [0, 1] and router.process.pid not in pids.values()
            results = [None] * 40

            def run(index):
                results[index] = relay_digest(port, index, 256 << 10)

            threads = [threading.Thread(daemon=True, target=run, args=(i,)) for i in range(40)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            events = router.wait_access_events(40)
            metrics = router.metrics()
    for index, result in enumerate(results):
        assert result == (stream_digest(index, 256 << 10), 256 << 10), index
    assert {e["worker"] for e in events} == {0, 1}  # 40 connections spread over both
    accepted = metrics[("l4router_connections_accepted_total", frozenset({("listener", "front")}))]
    assert accepted == 40  # summed over the workers' metric files, each counted once
    assert metrics[("l4router_workers_ready", frozenset())] == 2
    per_worker = {
        dict(labels)["worker"]
        for (name, labels) in metrics
        if name == "l4router_worker_resident_memory_bytes"
    }
    assert per_worker == {"0", "1"}


def test_a_killed_worker_is_restarted_on_its_socket_and_no_client_fails(tmp_path):
    with Backend("app", reply_with_name) as backend:
        port = free_port()
        with Router(tmp_path, stream_config(port, backend.port), workers=2) as router:
            victim = worker_pids(router)[1]
            answers, stop = [], threading.Event()

            def steady():
                while not stop.is_set():
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                            c.sendall(b"ping")
                            answers.append(read_to_end(c, limit=100)[1])
                    except OSError as exc:
                        answers.append(exc)

            loader = threading.Thread(target=steady, daemon=True)
            loader.start()
            try:
                time.sleep(0.5)
                os.kill(victim, signal.SIGKILL)
                wait_until(lambda: worker_pids(router)[1] != victim, message="a new worker 1")
                wait_until(
                    lambda: router.metric("l4router_workers_ready") == 2,
                    timeout=15,
                    message="both workers ready again",
                )
                time.sleep(0.5)
            finally:
                stop.set()
                loader.join(30)
            exits = router.metric("l4router_worker_exits_total", worker="1")
    assert exits == 1
    # One client at a time: only the connection the worker held when it was killed can be
    # lost. Those the kernel queued on its socket meanwhile waited for its successor.
    lost = [a for a in answers if a != len(b"app:ping")]
    assert len(answers) > 20 and len(lost) <= 1, lost[:3]


def test_sighup_reaches_every_worker_in_place(tmp_path):
    with Backend("old", reply_with_name) as old, Backend("new", reply_with_name) as new:
        port = free_port()
        with Router(tmp_path, stream_config(port, old.port), workers=2) as router:
            pids = worker_pids(router)
            assert ask_many(port, 20) == {b"old:ping"}
            text = router.config_path.read_text()
            router.config_path.write_text(text.replace(str(old.port), str(new.port)))
            router.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda: router.metric("l4router_config_reloads_total", result="success") == 1,
                message="the reload",
            )
            wait_until(
                lambda: (
                    len(
                        [
                            e
                            for e in router.events()
                            if e.get("log_format") == "Reloaded the config (sha256 {digest})"
                        ]
                    )
                    == 3
                ),
                message="the supervisor and both workers reloaded",
            )
            assert ask_many(port, 40) == {b"new:ping"}
            assert worker_pids(router) == pids  # the same processes


def test_a_new_address_or_worker_count_starts_a_new_generation_and_the_old_drains(tmp_path):
    def echo_named(backend, connection):
        while data := connection.recv(65536):
            connection.sendall(backend.name.encode() + b":" + data)

    with Backend("app", echo_named) as backend:
        port, moved = free_port(), free_port()
        with Router(tmp_path, stream_config(port, backend.port), workers=2) as router:
            old_pids = set(worker_pids(router).values())
            established = socket.create_connection(("127.0.0.1", port), timeout=10)
            established.sendall(b"before")
            assert established.recv(100) == b"app:before"
            text = router.config_path.read_text().replace(
                f'listen: "127.0.0.1:{port}"', f'listen: ["127.0.0.1:{port}", "127.0.0.1:{moved}"]'
            )
            router.config_path.write_text(text.replace("workers: 2", "workers: 3"))
            assert router.post("/reload")[0] == 200
            new_pids = set(worker_pids(router).values())
            assert len(new_pids) == 3 and not new_pids & old_pids
            assert ask_many(moved, 10) == {b"app:ping"}
            assert ask_many(port, 10) == {b"app:ping"}
            # The relay held by an old worker goes on while that worker drains.
            established.sendall(b"after")
            assert established.recv(100) == b"app:after"
            assert any(alive(pid) for pid in old_pids)
            established.close()
            wait_until(
                lambda: not any(alive(pid) for pid in old_pids),
                timeout=15,
                message="the old generation to exit once drained",
            )
            assert router.metric("l4router_workers") == 3
            # An address that cannot be bound: refused, the running generation stays.
            with socket.socket() as holder:
                holder.bind(("127.0.0.1", 0))
                holder.listen()
                busy = holder.getsockname()[1]
                router.config_path.write_text(
                    text.replace(f"127.0.0.1:{moved}", f"127.0.0.1:{busy}")
                )
                code, answer = router.post("/reload")
            assert code == 422
            assert b"Address already in use" in answer
            assert set(worker_pids(router).values()) == new_pids
            assert ask_many(moved, 5) == {b"app:ping"}


def ask_many(port, count):
    answers = set()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            answers.add(client.recv(100))
    return answers


def stream_out(backend, connection):
    connection.recv(100)
    for chunk in pseudo_random_stream(7, STREAM):
        connection.sendall(chunk)


def test_sigterm_drains_every_worker_then_the_supervisor_exits_0(tmp_path):
    with Backend("source", stream_out) as backend:
        port = free_port()
        with Router(tmp_path, stream_config(port, backend.port), workers=2) as router:
            pids = list(worker_pids(router).values())
            results = [None] * 8

            def slow_reader(index):
                with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                    client.sendall(b"go")
                    time.sleep(1.0)  # still relaying when SIGTERM arrives
                    results[index] = read_to_end(client)

            readers = [
                threading.Thread(daemon=True, target=slow_reader, args=(i,)) for i in range(8)
            ]
            for reader in readers:
                reader.start()
            wait_until(lambda: backend.connections == 8, message="8 relays")
            router.process.send_signal(signal.SIGTERM)
            readyz = wait_until(lambda: router.error_status("/readyz"), message="/readyz 503")
            assert readyz == 503
            for reader in readers:
                reader.join(60)
            code = router.process.wait(30)
    assert code == 0, router.log_text()
    assert results == [(stream_digest(7, STREAM), STREAM)] * 8
    assert not any(alive(pid) for pid in pids)
    messages = [(e.get("worker"), e.get("log_format")) for e in router.events()]
    workers_done = max(
        i for i, m in enumerate(messages) if m[1] == "l4router stopped" and m[0] is not None
    )
    assert messages.index((None, "All workers stopped")) > workers_done
    assert messages[-1] != (None, "All workers stopped")  # the supervisor stops after them
    assert (None, "l4router stopped") in messages[workers_done:]


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(tmp_path):
    with Backend("app", reply_with_name) as backend:
        port = free_port()
        router = Router(tmp_path, stream_config(port, backend.port), workers=2).start()
        try:
            pids = list(worker_pids(router).values())
            router.process.kill()
            router.process.wait(10)
            wait_until(
                lambda: not any(alive(pid) for pid in pids),
                timeout=15,
                message="orphaned workers to stop",
            )
        finally:
            router.stop()
    assert any(e.get("log_format") == "The supervisor is gone: stopping" for e in router.events())


def test_udp_clients_keep_to_one_worker(tmp_path):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = free_port()
    config = f"""
listeners:
  - name: dns_in
    transport: udp
    listen: "127.0.0.1:{port}"
    default: echo
backends:
  echo: {{servers: ["127.0.0.1:{server.getsockname()[1]}"]}}
"""
    stop = threading.Event()

    def echo_datagrams():
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(65535)
            except socket.timeout:  # TimeoutError from Python 3.10 on; PyPy 3.9 has this
                continue
            server.sendto(data, peer)

    echoer = threading.Thread(daemon=True, target=echo_datagrams)
    echoer.start()
    try:
        with Router(tmp_path, config, workers=2) as router:
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(24)]
            for index, client in enumerate(clients):
                client.settimeout(5)
                for number in range(5):
                    payload = b"client %d datagram %d" % (index, number)
                    client.sendto(payload, ("127.0.0.1", port))
                    assert client.recvfrom(65535)[0] == payload
            metrics = router.metrics()
            for client in clients:
                client.close()
    finally:
        stop.set()
        echoer.join(5)
        server.close()
    created = sum(
        value
        for (name, labels), value in metrics.items()
        if name == "l4router_udp_sessions_created_total"
    )
    upstream = metrics[
        (
            "l4router_udp_datagrams_total",
            frozenset({("listener", "dns_in"), ("direction", "upstream")}),
        )
    ]
    assert created == 24  # one session per client: its datagrams never changed worker
    assert upstream == 24 * 5


def test_a_port_in_use_stops_the_supervisor_before_any_worker_starts(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "busy.yaml"
        path.write_text(
            f"listeners: [{{name: a, listen: '127.0.0.1:{port}', default: reject}}]\nworkers: 2\n"
        )
        result = run_twistd("-c", str(path), cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("l4router:")]
    assert lines == [
        f"l4router: cannot listen on tcp:{port}:interface=127.0.0.1:backlog=1024: "
        f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
    ]
    assert "Worker" not in result.stdout


def test_workers_need_sockets_they_can_each_have(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text(
        "listeners: [{name: a, listen: 'unix:/tmp/l4router-test.sock', "
        "default: reject}]\nworkers: 2\n"
    )
    result = run_twistd("-c", str(path), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert "  workers: 2 workers each need their own socket" in result.stderr
    path.write_text("listeners: [{name: a, listen: '127.0.0.1:1', default: reject}]\nworkers: 0\n")
    result = run_twistd("-c", str(path), "--check", cwd=tmp_path)
    assert "  workers: must be auto or a number of processes from 1 to 256, not 0" in result.stderr


def test_status_views_merge_the_workers(tmp_path):
    CLIENTS = 24

    def hold(backend, connection):
        connection.recv(100)
        connection.recv(100)  # until the client closes

    with Backend("held", hold) as backend:
        port = free_port()
        # A per-source limit makes the listener steer by source address (a socket per
        # worker, l4router.process.steering): 24 sources are spread over both workers
        # whatever the load. (Without it the workers share one socket, and an idle worker
        # that is quick to wake may take every client: spread by load, not by address.)
        config = stream_config(port, backend.port).replace(
            "default: app", "default: app\n    max_connections_per_source: 100"
        )
        with Router(tmp_path, config, workers=2) as router:
            clients = []
            for index in range(CLIENTS):
                client = socket.create_connection(
                    ("127.0.0.1", port), timeout=10, source_address=(f"127.0.0.{index + 1}", 0)
                )
                client.sendall(b"hello")
                clients.append(client)
            wait_until(lambda: backend.connections == CLIENTS, message="every relay")
            live = json.loads(router.get("/status/connections"))
            overview = json.loads(router.get("/status"))
            backends = json.loads(router.get("/status/backends"))
            page = router.get("/").decode()
            for client in clients:
                client.close()
    assert len(live) == CLIENTS and {c["worker"] for c in live} == {0, 1}
    assert overview["workers"] == 2
    [front] = overview["listeners"]
    assert front["accepted"] == CLIENTS and front["active_connections"] == CLIENTS
    assert front["addresses"] == [f"127.0.0.1:{port}"]
    assert [r["hits"] for r in front["routes"] if r["route"] == "default"] == [CLIENTS]
    [server] = backends[0]["servers"]
    assert server["active_connections"] == CLIENTS and server["healthy"]
    assert "front" in page and f"127.0.0.1:{backend.port}" in page


def test_max_connections_is_shared_by_the_workers(tmp_path):
    release = threading.Event()

    def hold_until_released(backend, connection):
        connection.recv(100)
        release.wait(30)

    with Backend("held", hold_until_released) as backend:
        port = free_port()
        config = stream_config(port, backend.port).replace(
            "    detect: {timeout: 200ms}", "    detect: {timeout: 200ms}\n    max_connections: 50"
        )
        try:
            with Router(tmp_path, config, workers=2) as router:
                clients = []
                for index in range(200):
                    client = socket.create_connection(("127.0.0.1", port), timeout=10)
                    client.sendall(b"hello %d" % index)
                    clients.append(client)
                wait_until(
                    lambda: (
                        router.metric(
                            "l4router_connections_rejected_total",
                            listener="front",
                            reason="limit_listener",
                        )
                        == 150
                    ),
                    message="150 refusals",
                )
                wait_until(lambda: backend.connections >= 50, message="50 relays")
                time.sleep(0.3)
                relayed = backend.connections
                accepted = router.metric("l4router_connections_accepted_total", listener="front")
                release.set()
                for client in clients:
                    client.close()
        finally:
            release.set()
    # Exactly 50 in all, whichever workers took them.
    assert relayed == 50 and accepted == 50


@pytest.mark.parametrize("per_source_limit", [False, True])
def test_one_source_uses_every_worker_unless_a_per_source_limit_steers_it(
    tmp_path, per_source_limit
):
    """Steering by source is for exact per-source limits; without one, the workers share the
    listening socket and even one busy source (a balancer, a benchmark) is spread over them."""
    with Backend("echo", echo) as backend:
        port = free_port()
        config = stream_config(port, backend.port)
        if per_source_limit:
            config = config.replace(
                "    default: app", "    default: app\n    max_connections_per_source: 100"
            )
        with Router(tmp_path, config, workers=2) as router:
            for index in range(40):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    client.sendall(b"ping %d" % index)
                    client.shutdown(socket.SHUT_WR)
                    assert read_to_end(client)[1] == len(b"ping %d" % index)
            events = router.wait_access_events(40)
    workers = collections.Counter(e["worker"] for e in events)
    if per_source_limit:
        assert len(workers) == 1, workers
    else:
        assert set(workers) == {0, 1}, workers


def test_a_worker_killed_while_it_starts_is_restarted(tmp_path):
    """Killed before it was ready (by the OOM killer, say): restarted, not a stop of
    everything (which is for a worker that exits by itself: a broken install)."""
    with Backend("app", reply_with_name) as backend:
        port = free_port()
        router = Router(tmp_path, stream_config(port, backend.port), workers=2)
        router.log_file = open(router.log_path, "wb")
        router.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "l4router", "-c", str(router.config_path)],
            stdout=router.log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            wait_until(
                lambda: len(worker_pids(router)) == 2, timeout=20, message="both workers started"
            )
            os.kill(worker_pids(router)[1], signal.SIGKILL)  # as soon as it is spawned
            wait_until(
                lambda: (
                    router.error_status("/readyz") is None
                    and router.metric("l4router_workers_ready") == 2
                ),
                timeout=30,
                message="both workers ready",
            )
            assert router.metric("l4router_worker_exits_total", worker="1") == 1
            assert ask_many(port, 10) == {b"app:ping"}
        finally:
            assert router.stop() == 0, router.log_text()


def _memory(pid, field):
    """A field of /proc/PID/smaps_rollup, in KiB."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _socket_inodes(pid):
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _listening_inode(port):
    """The inode of the socket listening on 127.0.0.1:PORT (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def test_workers_are_forked_sharing_the_supervisors_pages_and_none_of_its_sockets(tmp_path):
    """Workers come from a fork server the supervisor forked once everything was imported:
    they share its pages (PSS) and hold only what they were handed (not the admin site)."""
    with Backend("app", reply_with_name) as backend:
        port = free_port()
        with Router(tmp_path, stream_config(port, backend.port), workers=2) as router:
            assert ask_many(port, 10) == {b"app:ping"}
            workers = list(worker_pids(router).values())
            fork_server = parent_of(workers[0])
            assert parent_of(workers[1]) == fork_server
            assert parent_of(fork_server) == router.process.pid
            admin = _listening_inode(router.admin_port)
            assert admin in _socket_inodes(router.process.pid)
            for pid in workers + [fork_server]:
                assert admin not in _socket_inodes(pid)
                # Pages written since the fork are the worker's own; the rest is shared.
                assert _memory(pid, "Shared_Dirty") > 16 * 1024, pid
                assert _memory(pid, "Pss") < _memory(pid, "Rss") * 0.6, pid


def test_a_supervisor_whose_fork_server_is_gone_stops_in_order(tmp_path):
    """Nothing could start a worker any more: the supervisor says so and stops in order (its
    workers drain and stop) instead of running on unable to replace one."""
    with Backend("app", reply_with_name) as backend:
        port = free_port()
        router = Router(tmp_path, stream_config(port, backend.port), workers=2).start()
        try:
            workers = list(worker_pids(router).values())
            os.kill(parent_of(workers[0]), signal.SIGKILL)
            assert router.process.wait(30) == 0
            wait_until(
                lambda: not any(alive(pid) for pid in workers),
                timeout=15,
                message="the workers to stop",
            )
        finally:
            router.stop()
    messages = [e.get("log_format") for e in router.events()]
    assert "The fork server is gone: no worker could be started again; stopping" in messages
    assert "All workers stopped" in messages
