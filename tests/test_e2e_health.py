"""Health checks that speak: each probe against real servers (nginx over HTTP and TLS, OpenSSH,
a Redis- and a PostgreSQL-speaking test server) and against servers that accept connections
but answer something else, which must be marked down."""

import json
import socket

import pytest
import trustme

from tests.support import Backend, Router, free_port, running_nginx, wait_until

pytestmark = pytest.mark.timeout(120)

NGINX_CONF = """
daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
    server {{
        listen 127.0.0.1:{http_port};
        location = /healthz {{ return 200 "ok\\n"; }}
        location = /broken {{ return 503 "down\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {prefix}/cert.pem; ssl_certificate_key {prefix}/key.pem;
        location / {{ return 200 "tls\\n"; }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    """A real nginx: plain HTTP with /healthz (200) and /broken (503), and a TLS server."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    certificate = trustme.CA().issue_cert("web.example")
    certificate.private_key_pem.write_to_path(str(prefix / "key.pem"))
    certificate.cert_chain_pems[0].write_to_path(str(prefix / "cert.pem"))
    http_port, tls_port = free_port(), free_port()
    config = NGINX_CONF.format(prefix=prefix, http_port=http_port, tls_port=tls_port)
    with running_nginx(prefix, config, (http_port, tls_port)):
        yield http_port, tls_port


def answer_lines(answers):
    """A test server that reads what it is sent and answers `answers(first bytes)`."""

    def handle(backend, connection):
        data = connection.recv(4096)
        backend.record(data)
        connection.sendall(answers(data))
        connection.recv(1)

    return handle


redis_like = answer_lines(lambda data: b"+PONG\r\n" if b"PING" in data else b"-ERR\r\n")
postgres_like = answer_lines(lambda data: b"N" if data[4:8] == b"\x04\xd2\x16\x2f" else b"E")
garbage = answer_lines(lambda data: b"\x00\xffgarbage\r\n\r\n")


def backend_block(name, port, check):
    return (
        f'  {name}:\n    servers: ["127.0.0.1:{port}"]\n'
        f"    health_check: {{interval: 200ms, timeout: 1s, rise: 1, fall: 1, {check}}}\n"
    )


def test_each_probe_keeps_its_speaking_server_up_and_marks_a_wrong_one_down(tmp_path, nginx, sshd):
    http_port, tls_port = nginx
    ssh_port, _ = sshd
    with (
        Backend("redis", redis_like) as redis,
        Backend("pg", postgres_like) as postgres,
        Backend("garbage", garbage) as junk,
    ):
        expected = {  # backend -> (port, check, up?)
            "http_ok": (http_port, "probe: http, path: /healthz", True),
            "http_503": (http_port, "probe: http, path: /broken", False),
            "http_class": (http_port, "probe: http, path: /broken, expect_status: [5xx]", True),
            "tls_ok": (tls_port, "probe: tls, sni: web.example", True),
            "tls_on_http": (http_port, "probe: tls", False),
            "ssh_ok": (ssh_port, "probe: ssh", True),
            "ssh_on_http": (http_port, "probe: ssh", False),
            "redis_ok": (redis.port, "probe: redis", True),
            "redis_garbage": (junk.port, "probe: redis", False),
            "postgres_ok": (postgres.port, "probe: postgres", True),
            "postgres_garbage": (junk.port, "probe: postgres", False),
            "content_ok": (
                redis.port,
                'probe: content, send: "PING\\r\\n", expect: "^\\\\+PONG"',
                True,
            ),
            "content_bad": (junk.port, 'probe: content, send: "hello\\n", expect: "^OK"', False),
        }
        port = free_port()
        config = (
            f'listeners:\n  - name: front\n    listen: "127.0.0.1:{port}"\n'
            "    default: reject\nbackends:\n"
            + "".join(backend_block(name, p, check) for name, (p, check, _) in expected.items())
        )
        with Router(tmp_path, config) as router:

            def settled():
                return all(
                    router.metric(
                        "l4router_backend_health_checks_total",
                        backend=name,
                        server=f"127.0.0.1:{p}",
                        result="ok" if up else "failed",
                    )
                    >= 2
                    for name, (p, _, up) in expected.items()
                )

            wait_until(settled, timeout=20, message="two checks of every backend")
            states = {
                b["backend"]: b["servers"][0]["healthy"]
                for b in json.loads(router.get("/status/backends"))
            }
            ups = {
                name: router.metric(
                    "l4router_backend_server_up", backend=name, server=f"127.0.0.1:{p}"
                )
                for name, (p, _, _) in expected.items()
            }
    assert states == {name: up for name, (_, _, up) in expected.items()}
    assert ups == {name: float(up) for name, (_, _, up) in expected.items()}
    why = {
        e["backend"]: e["why"]
        for e in router.events()
        if e.get("log_format", "").startswith("Backend {backend} server {server} is down")
    }
    assert "HTTP 503, expected 2xx or 3xx" in why["http_503"]
    assert "not a TLS ServerHello" in why["tls_on_http"]
    assert "not an SSH banner" in why["ssh_on_http"]
    assert "not PONG" in why["redis_garbage"]
    assert "not a PostgreSQL answer" in why["postgres_garbage"]
    assert redis.results and all(b"PING" in r for r in redis.results)


def test_a_server_that_accepts_and_never_answers_is_down_after_the_timeout(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts in the kernel only
    try:
        silent_port = silent.getsockname()[1]
        port = free_port()
        config = (
            f'listeners:\n  - name: front\n    listen: "127.0.0.1:{port}"\n'
            "    default: reject\nbackends:\n"
            + backend_block("mute", silent_port, "probe: redis").replace(
                "timeout: 1s", "timeout: 300ms"
            )
        )
        with Router(tmp_path, config) as router:
            wait_until(
                lambda: (
                    router.metric(
                        "l4router_backend_server_up",
                        backend="mute",
                        server=f"127.0.0.1:{silent_port}",
                    )
                    == 0
                    and router.metric(
                        "l4router_backend_health_checks_total",
                        backend="mute",
                        server=f"127.0.0.1:{silent_port}",
                        result="failed",
                    )
                    >= 1
                ),
                timeout=10,
                message="the mute server marked down",
            )
    finally:
        silent.close()
    why = [
        e["why"]
        for e in router.events()
        if e.get("log_format", "").startswith("Backend {backend} server {server} is down")
    ]
    assert why and "no answer within 0.3s" in why[0]
