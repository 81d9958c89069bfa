"""Start-up through the real twistd: --check, config errors, bind errors, the quickstart,
and the installed plugin seen from outside the checkout."""

import os
import socket
import subprocess
import sys

import pytest

from tests.support import TWISTD, free_port, run_twistd, wait_until

pytestmark = pytest.mark.timeout(300)

BAD_CONFIGS = {
    "bad_yaml": ("listeners: [\n  - name: a\n   listen: x", "not valid YAML"),
    "unknown_key": (
        "listeners: [{name: a, listen: '127.0.0.1:1', colour: red}]",
        "listeners[0].colour: unknown key",
    ),
    "bad_duration": (
        "listeners: [{name: a, listen: '127.0.0.1:1', idle_timeout: soon}]",
        "listeners[0].idle_timeout: must be a duration",
    ),
    "unknown_backend": (
        "listeners: [{name: a, listen: '127.0.0.1:1', routes: "
        "[{match: {protocol: tls}, backend: ghost}]}]",
        "listeners[0].routes[0].backend: no backend is called 'ghost'",
    ),
    "duplicate_listener": (
        "listeners: [{name: a, listen: '127.0.0.1:1'}, {name: a, listen: '127.0.0.1:2'}]",
        "listeners[1].name: duplicate listener name 'a'",
    ),
    "bad_cidr": (
        "listeners: [{name: a, listen: '127.0.0.1:1', routes: "
        "[{match: {source: [10.1.2.0/24, 300.1.1.1]}, reject: true}]}]",
        "listeners[0].routes[0].match.source: '300.1.1.1' is not an IP address",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_stops_start_up_naming_the_key_path(tmp_path, name):
    text, expected = BAD_CONFIGS[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for extra in (["--check"], []):
        result = run_twistd("-c", str(path), *extra, cwd=tmp_path)
        assert result.returncode == 2, result
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "twistd.pid").exists()


def test_check_accepts_a_good_config(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(
        "listeners: [{name: a, listen: '127.0.0.1:1', default: b}]\n"
        "backends: {b: {servers: ['127.0.0.1:2']}}\n"
    )
    result = run_twistd("-c", str(path), "--check")
    assert result.returncode == 0, result.stderr
    assert "is valid: 1 listeners, 1 backends" in result.stdout


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = tmp_path / "busy.yaml"
        path.write_text(
            f"listeners: [{{name: a, listen: '127.0.0.1:{port}'}}]\n"
            f"admin: {{listen: '127.0.0.1:{free_port()}'}}\n"
        )
        result = run_twistd("-c", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("l4router:")]
    assert lines == [
        f"l4router: cannot listen on tcp:{port}:interface=127.0.0.1:backlog=1024: "
        "Couldn't listen on 127.0.0.1:" + f"{port}: [Errno 98] Address already in use."
    ]


def test_quickstart_with_no_config_routes_curl_to_its_own_metrics(tmp_path):
    for port in (8080, 9100):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is busy"
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "l4router"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def metrics_through_router():
            try:
                return subprocess.run(
                    ["curl", "-sf", "http://127.0.0.1:8080/metrics"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
            except subprocess.TimeoutExpired:
                return ""

        body = wait_until(
            metrics_through_router, timeout=20, interval=0.2, message="curl through the quickstart"
        )
        # The connection that carried this very request is counted and active.
        assert 'l4router_connections_active{listener="quickstart"} 1.0' in body
        assert (
            'l4router_connections_routed_total{backend="admin",listener="quickstart",'
            'protocol="http1",route="http-to-admin"} 1.0'
        ) in body
        with socket.create_connection(("127.0.0.1", 8080)) as other:
            other.sendall(b"\x16\x03\x01\x00\x05hello")
            assert other.recv(10) == b""  # anything but HTTP/1 is rejected
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "quickstart.yaml" in output  # it says which config it uses


def test_installed_twistd_lists_the_plugin_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [TWISTD, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert "l4router" in result.stdout
    result = subprocess.run(
        [TWISTD, "l4router", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert "--config" in result.stdout and "--check" in result.stdout


def test_plain_pip_install_in_a_fresh_virtualenv(tmp_path):
    """A non-editable install finds the twistd plugin and the detectors (dropin.cache aside)."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", checkout]
    subprocess.run(pip, check=True, timeout=300, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    twistd = str(venv / "bin" / "twistd")
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import l4router, twisted.plugins.l4router_plugin as p; print(l4router.__file__);"
            "print(p.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert str(venv) in where.stdout.splitlines()[0], where
    assert str(venv) in where.stdout.splitlines()[1], where
    result = subprocess.run(
        [twistd, "l4router", "--check"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "quickstart.yaml is valid" in result.stdout
    detectors = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from l4router.detection.registry import installed_detectors as d;"
            "print(sorted(x.name for x in d()))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert "'http1'" in detectors.stdout and "'tls'" in detectors.stdout
    python = str(venv / "bin" / "python")
    record = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m;print('\\n'.join(str(f) for f in m.files('l4router')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    ).stdout.split()
    shipped_under_twisted = sorted(
        f for f in record if f.startswith("twisted/") and not f.endswith(".pyc")
    )
    assert shipped_under_twisted == ["twisted/plugins/l4router_plugin.py"]
    subprocess.run(
        [python, "-m", "pip", "uninstall", "-y", "-q", "l4router"],
        check=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    still = subprocess.run(
        [python, "-c", "import twisted.plugin, twisted.internet.reactor"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert still.returncode == 0, still.stderr  # uninstalling l4router keeps Twisted whole
