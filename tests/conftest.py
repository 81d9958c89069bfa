"""Before any test: the system tools the end-to-end tests drive are there, or the run stops
saying exactly what to install. As root on Debian (a fresh machine, CI) they are installed,
so that the README's test command alone prepares the machine.

Every test also gets the marker of its tier (see CONTRIBUTING.md): `pure` (bytes in, values
out), `memory` (Twisted's in-memory reactor and transports, or a reactor turned by hand), and
`process` (the real `twistd -n l4router` with real clients and servers)."""

import os
import shutil
import subprocess

import pytest

from tests.support import free_port, listening, wait_until

# The program each end-to-end test runs -> the Debian package that brings it.
SYSTEM_TOOLS = {
    "curl": "curl",
    "openssl": "openssl",
    "ssh": "openssh-client",
    "sshd": "openssh-server",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "chromium": "chromium",
    "systemd-socket-activate": "systemd",
}
SBIN = ("/usr/sbin", "/sbin")


def _missing_packages():
    missing = []
    for program, package in SYSTEM_TOOLS.items():
        found = shutil.which(program) or any(os.path.exists(os.path.join(d, program)) for d in SBIN)
        if not found:
            missing.append(package)
    return sorted(set(missing))


PURE = {
    "test_config",
    "test_detection",
    "test_detection_session",
    "test_detectors",
    "test_parsers_fuzz",
    "test_parsers_http1",
    "test_parsers_proxyprotocol",
    "test_parsers_tls",
    "test_udp_detectors",
}
MEMORY = {"test_backends", "test_tcp", "test_reactor", "test_stream", "test_timers", "test_metrics"}
TIERS = ("pure", "memory", "process")


def pytest_configure(config):
    for tier, meaning in zip(
        TIERS,
        ("bytes in, values out", "an in-memory or hand-turned reactor", "the real router process"),
    ):
        config.addinivalue_line("markers", f"{tier}: {meaning}")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        tier = "pure" if module in PURE else "memory" if module in MEMORY else "process"
        item.add_marker(tier)


def pytest_sessionstart(session):
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.exit(
            f"the end-to-end tests need these Debian packages: apt-get install {' '.join(missing)}",
            returncode=3,
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)
    still = _missing_packages()
    if still:
        pytest.exit(f"apt-get did not bring {' '.join(still)}", returncode=3)


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH server on a loopback port, accepting one generated key for this user."""
    sshd_path = shutil.which("sshd") or "/usr/sbin/sshd"
    assert os.path.exists(sshd_path), "sshd missing: apt-get install openssh-server"
    folder = tmp_path / "sshd"
    folder.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host")], check=True
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "user")], check=True
    )
    (folder / "authorized_keys").write_bytes((folder / "user.pub").read_bytes())
    os.makedirs("/run/sshd", exist_ok=True)
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
        f"PasswordAuthentication no\nPermitRootLogin prohibit-password\nPidFile none\n"
    )
    process = subprocess.Popen(
        [sshd_path, "-D", "-e", "-f", str(folder / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    try:
        wait_until(lambda: listening(port), message="sshd to listen")
        yield port, folder / "user"
    finally:
        process.terminate()
        process.wait(10)
