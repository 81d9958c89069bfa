"""Before any test: the system tools the end-to-end tests drive are there, or the run stops
saying exactly what to install. As root on Debian (a fresh machine, CI) they are installed,
so that the README's test command alone prepares the machine."""

import os
import shutil
import subprocess

import pytest

# The program each end-to-end test runs -> the Debian package that brings it.
SYSTEM_TOOLS = {
    "curl": "curl",
    "openssl": "openssl",
    "ssh": "openssh-client",
    "sshd": "openssh-server",
    "nginx": "nginx",
    "chromium": "chromium",
    "systemd-socket-activate": "systemd",
}
SBIN = ("/usr/sbin", "/sbin")


def _missing_packages():
    missing = []
    for program, package in SYSTEM_TOOLS.items():
        found = shutil.which(program) or any(os.path.exists(os.path.join(d, program))
                                             for d in SBIN)
        if not found:
            missing.append(package)
    return sorted(set(missing))


def pytest_sessionstart(session):
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.exit("the end-to-end tests need these Debian packages: "
                    f"apt-get install {' '.join(missing)}", returncode=3)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)
    still = _missing_packages()
    if still:
        pytest.exit(f"apt-get did not bring {' '.join(still)}", returncode=3)
