"""Upgrades without a refused connection: a second l4router started on the same config takes
the listening sockets over from the running one (its upgrade_socket), which then drains and
exits, while clients connect all along and a long relay goes on to its end."""

import subprocess
import threading
import time

import pytest

from tests.support import TWISTD, Backend, Router, free_port, stream_digest
from tests.test_e2e_control import LongRelay, SteadyClients, name_then_echo

pytestmark = pytest.mark.timeout(180)


# (2, 3): the new process has more workers than there are sockets to take over (the old
# ones shared one listening socket: more workers accept on it, nothing is bound again).
@pytest.mark.parametrize("workers, new_workers", [(1, 1), (2, 2), (2, 3)])
def test_a_new_process_takes_over_with_no_refused_connection(tmp_path, workers, new_workers):
    with Backend("app", name_then_echo) as app:
        port = free_port()
        config = f"""
listeners:
  - {{name: edge, listen: "127.0.0.1:{port}", detect: {{timeout: 100ms}}, default: app}}
backends:
  app: {{servers: ["127.0.0.1:{app.port}"]}}
upgrade_socket: {tmp_path / "upgrade.sock"}
"""
        (tmp_path / "old").mkdir()
        (tmp_path / "new").mkdir()
        old = Router(tmp_path / "old", config, workers=workers).start()
        new = Router(tmp_path / "new", config, admin_port=old.admin_port, workers=new_workers)
        try:
            relay = LongRelay(port, "app", size=16 << 20)
            relaying = threading.Thread(target=relay.run, daemon=True)
            relaying.start()
            with SteadyClients(port) as clients:
                time.sleep(0.5)
                # Started as the old one was: it finds the upgrade socket and takes over.
                new.log_file = open(new.log_path, "wb")
                new.process = subprocess.Popen(
                    [TWISTD, "-n", "--pidfile=", "l4router", "-c", str(new.config_path)],
                    stdout=new.log_file,
                    stderr=subprocess.STDOUT,
                    cwd=new.tmp_path,
                )
                assert old.process.wait(60) == 0, old.log_text()
                before_end = len(clients.seen)
                time.sleep(0.5)
            relaying.join(60)
            after = [name for _, name in clients.seen[before_end:]]
            assert after and all(r == "app" for r in after)
            assert new.get("/readyz" if new_workers > 1 else "/healthz") in (b"ok\n", b"ready\n")
        finally:
            old.stop()
            code = new.stop()
    assert not clients.failures(), clients.failures()[:3]
    assert len(clients.seen) > 20
    assert relay.result == (stream_digest(relay.seed, 16 << 20), 16 << 20)
    assert code == 0
    old_messages = [e.get("log_format", "") for e in old.events()]
    assert any(m.startswith("Handed {count} listening sockets") for m in old_messages)
    assert any(m.startswith("The new l4router (pid {pid}) accepts") for m in old_messages)
    assert any(
        m.startswith("Took over {count} listening sockets")
        for m in (e.get("log_format", "") for e in new.events())
    )
