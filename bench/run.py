"""Side-by-side benchmark: direct, l4router, HAProxy (TCP mode with content inspection),
nginx stream (ssl_preread) and sslh, on the same loopback backends, one after the other.

    python bench/run.py [--runs 3] [--seconds 5] [--only l4router,haproxy] [--json out.json]

Every proxy listens on three ports and inspects what arrives: BULK (iperf3 -> iperf3 server),
HTTP (wrk -> nginx, routed as HTTP) and TLS (wrk over https, a new handshake per request ->
nginx TLS, routed by SNI).
Figures are the median of --runs runs; the table gives each as a ratio to HAProxy and to
direct. See bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
SNI = "localhost"  # resolves to 127.0.0.1 for the TLS client without touching /etc/hosts
IDLE_CONNECTIONS = 5000
TOOLS = {
    "haproxy": "haproxy",
    "nginx": "nginx",
    "sslh-select": "sslh",
    "iperf3": "iperf3",
    "wrk": "wrk",
    "openssl": "openssl",
    "strace": "strace",
}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
PYPY_ENV = os.environ.get("L4ROUTER_PYPY_ENV", "/opt/pypy-l4router")
# The newest cryptography with a wheel for Debian's PyPy 3.9 (later ones need a Rust build).
PYPY_CONSTRAINTS = "cryptography==43.0.3\n"


def install_peers():
    missing = [
        package
        for tool, package in TOOLS.items()
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")
    ]
    if not os.path.exists(STREAM_MODULE):
        missing.append("libnginx-mod-stream")
    if not shutil.which("pypy3") or not os.path.exists("/usr/lib/pypy3.9/venv"):
        missing += ["pypy3", "pypy3-venv"]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *sorted(set(missing))], check=True)
    install_pypy_env()


def install_pypy_env():
    """l4router (this checkout) in a PyPy virtualenv, for the l4router-pypy target."""
    pip = os.path.join(PYPY_ENV, "bin", "pip")
    if not os.path.exists(pip):
        subprocess.run(["pypy3", "-m", "venv", PYPY_ENV], check=True)
    constraints = os.path.join(PYPY_ENV, "constraints.txt")
    with open(constraints, "w") as out:
        out.write(PYPY_CONSTRAINTS)
    subprocess.run(
        [
            pip,
            "install",
            "-q",
            "-c",
            constraints,
            "--config-settings",
            "editable_mode=compat",
            "-e",
            CHECKOUT,
        ],
        check=True,
    )


def process_tree(pid):
    """pid and all its descendants (nginx and HAProxy workers, twistd)."""
    pids = [pid]
    for child in pids:
        try:
            with open(f"/proc/{child}/task/{child}/children") as children:
                pids.extend(int(p) for p in children.read().split())
        except OSError:
            pass
    return pids


def _summed_kib(pid, name, field):
    """A `field: N kB` line of /proc/PID/`name`, in bytes, summed over the process tree."""
    total = 0
    for child in process_tree(pid):
        try:
            with open(f"/proc/{child}/{name}") as stream:
                total += next(
                    int(line.split()[1]) * 1024 for line in stream if line.startswith(field)
                )
        except (OSError, StopIteration):
            pass
    return total


def rss_bytes(pid):
    return _summed_kib(pid, "status", "VmRSS:")


def cpu_times(pid):
    """(user, system) CPU seconds of the process tree."""
    user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for child in process_tree(pid):
        try:
            with open(f"/proc/{child}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
                user += int(fields[11]) / tick
                system += int(fields[12]) / tick
        except OSError:
            pass
    return user, system


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def pss_bytes(pid):
    """Proportional set size of the process tree: shared pages (a forked worker's, say)
    counted once in all, not once per process as RSS counts them."""
    return _summed_kib(pid, "smaps_rollup", "Pss:")


STRACED_REQUESTS = 1000


def close_requests(port, count):
    """`count` HTTP requests with `Connection: close`, one at a time, each read to the end."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(request)
            while client.recv(65536):
                pass


def syscalls_per_connection(port, pid, count=STRACED_REQUESTS):
    """(system calls, epoll_ctl calls) per proxied connection: `strace -c -f` on every
    process of the target while `count` Connection: close requests pass through it."""
    close_requests(port, 50)  # warm: first imports, pools, caches
    pids = [str(p) for p in process_tree(pid)]
    summary = f"{tempfile.mkdtemp(prefix='strace-')}/summary"
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-o", summary, *[arg for p in pids for arg in ("-p", p)]],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached
    close_requests(port, count)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    calls = epoll_ctl = 0
    with open(summary) as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 5 and fields[-1] not in ("syscall", "total") and fields[3].isdigit():
                calls += int(fields[3])
                if fields[-1] == "epoll_ctl":
                    epoll_ctl += int(fields[3])
    return calls / count, epoll_ctl / count


class Backends:
    """iperf3, and nginx serving a small HTTP answer and TLS, shared by every target."""

    def __init__(self, folder):
        self.folder = folder
        self.iperf = free_port()
        self.http = free_port()
        self.tls = free_port()
        self.processes = []

    def start(self):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={SNI}",
                "-keyout",
                f"{self.folder}/key.pem",
                "-out",
                f"{self.folder}/cert.pem",
            ],
            check=True,
            capture_output=True,
        )
        conf = f"""
daemon off; worker_processes 1; error_log {self.folder}/backend-error.log;
pid {self.folder}/backend.pid;
events {{ worker_connections 20000; }}
http {{
    access_log off; keepalive_timeout 300s; keepalive_requests 1000000;
    client_body_temp_path {self.folder}; proxy_temp_path {self.folder};
    fastcgi_temp_path {self.folder}; uwsgi_temp_path {self.folder}; scgi_temp_path {self.folder};
    server {{ listen 127.0.0.1:{self.http};
              location / {{ return 200 "hello from the backend\\n"; }} }}
    server {{ listen 127.0.0.1:{self.tls} ssl; ssl_certificate {self.folder}/cert.pem;
             ssl_certificate_key {self.folder}/key.pem; ssl_session_cache off;
             ssl_session_tickets off; location / {{ return 200 "tls\\n"; }} }}
}}
"""
        with open(f"{self.folder}/backend-nginx.conf", "w") as out:
            out.write(conf)
        self.processes.append(
            subprocess.Popen(
                ["nginx", "-p", self.folder, "-c", f"{self.folder}/backend-nginx.conf"]
            )
        )
        self.processes.append(
            subprocess.Popen(
                ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf)],
                stdout=subprocess.DEVNULL,
            )
        )
        for port in (self.iperf, self.http, self.tls):
            wait_listening(port)

    def stop(self):
        for process in self.processes:
            process.terminate()
            process.wait(10)


class Target:
    """Something the load goes through: `ports` is (bulk, http, tls)."""

    name = ""

    def __init__(self, folder, backends):
        self.folder = folder
        self.backends = backends
        self.ports = (free_port(), free_port(), free_port())
        self.process = None

    def command(self):
        raise NotImplementedError

    def start(self):
        self.process = subprocess.Popen(
            self.command(), cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for port in self.ports:
            wait_listening(port)

    def stop(self):
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Direct(Target):
    name = "direct"

    def __init__(self, folder, backends):
        super().__init__(folder, backends)
        self.ports = (backends.iperf, backends.http, backends.tls)

    def start(self):
        pass


class L4Router(Target):
    """l4router as installed: a worker per core, the splice relay (the defaults)."""

    name = "l4router"
    workers = "auto"
    relay = "splice"

    def command(self):
        b = self.backends
        config = f"""
listeners:
  - name: bench
    listen: ["127.0.0.1:{self.ports[0]}", "127.0.0.1:{self.ports[1]}", "127.0.0.1:{self.ports[2]}"]
    detect: {{timeout: 5s}}
    relay: {self.relay}
    max_connections: 9000
    routes:
      - match: {{protocol: tls, sni: "{SNI}"}}
        backend: tls
      - match: {{protocol: http1}}
        backend: http
    default: iperf
backends:
  iperf: {{servers: ["127.0.0.1:{b.iperf}"]}}
  http: {{servers: ["127.0.0.1:{b.http}"]}}
  tls: {{servers: ["127.0.0.1:{b.tls}"]}}
logging: {{access_log: false, level: warn}}
workers: {self.workers}
"""
        with open(f"{self.folder}/l4router.yaml", "w") as out:
            out.write(config)
        twistd = shutil.which("twistd") or os.path.join(os.path.dirname(sys.executable), "twistd")
        return [twistd, "-n", "--pidfile=", "l4router", "-c", f"{self.folder}/l4router.yaml"]


class L4RouterOneProcess(L4Router):
    """l4router in one process (`workers: 1`): what one Python process does."""

    name = "l4router-1w"
    workers = 1


class L4RouterPyPy(L4Router):
    """l4router as installed, run by PyPy (Debian's pypy3, see install_pypy_env); PyPy 3.9
    has no os.splice, so it copies."""

    name = "l4router-pypy"

    def command(self):
        return [os.path.join(PYPY_ENV, "bin", "twistd"), *super().command()[1:]]


class L4RouterCopy(L4Router):
    """l4router with `relay: copy` (every byte through Python) instead of splice."""

    name = "l4router-copy"
    relay = "copy"


class HAProxy(Target):
    name = "haproxy"

    def command(self):
        b = self.backends
        binds = "\n".join(f"    bind 127.0.0.1:{port}" for port in self.ports)
        config = f"""
global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend inspect
{binds}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    tcp-request content accept if HTTP
    tcp-request content accept if {{ req.len gt 0 }}
    use_backend tls if {{ req.ssl_sni -m str {SNI} }}
    use_backend http if {{ req.hdr(host) -m found }}
    default_backend iperf
backend iperf
    server s 127.0.0.1:{b.iperf}
backend http
    server s 127.0.0.1:{b.http}
backend tls
    server s 127.0.0.1:{b.tls}
"""
        with open(f"{self.folder}/haproxy.cfg", "w") as out:
            out.write(config)
        return ["haproxy", "-db", "-f", f"{self.folder}/haproxy.cfg"]


class NginxStream(Target):
    name = "nginx"

    def command(self):
        b = self.backends
        config = f"""
daemon off; worker_processes auto; error_log {self.folder}/nginx-error.log;
pid {self.folder}/nginx.pid;
load_module {STREAM_MODULE};
events {{ worker_connections 9000; }}
stream {{
    map $ssl_preread_server_name $tls_upstream {{
        {SNI} 127.0.0.1:{b.tls}; default 127.0.0.1:{b.iperf};
    }}
    server {{ listen 127.0.0.1:{self.ports[0]}; ssl_preread on; proxy_pass 127.0.0.1:{b.iperf}; }}
    server {{ listen 127.0.0.1:{self.ports[1]}; ssl_preread on; proxy_pass 127.0.0.1:{b.http}; }}
    server {{ listen 127.0.0.1:{self.ports[2]}; ssl_preread on; proxy_pass $tls_upstream; }}
}}
"""
        with open(f"{self.folder}/nginx-stream.conf", "w") as out:
            out.write(config)
        return ["nginx", "-p", self.folder, "-c", f"{self.folder}/nginx-stream.conf"]


class SSLH(Target):
    name = "sslh"

    def command(self):
        b = self.backends
        listen = [arg for port in self.ports for arg in ("-p", f"127.0.0.1:{port}")]
        return [
            "sslh-select",
            "-f",
            "-n",
            *listen,
            "--tls",
            f"127.0.0.1:{b.tls}",
            "--http",
            f"127.0.0.1:{b.http}",
            "--anyprot",
            f"127.0.0.1:{b.iperf}",
            "--on-timeout",
            f"127.0.0.1:{b.iperf}",
        ]


TARGETS = [
    Direct,
    L4Router,
    L4RouterOneProcess,
    L4RouterCopy,
    L4RouterPyPy,
    HAProxy,
    NginxStream,
    SSLH,
]


def iperf(port, streams, seconds):
    out = subprocess.run(
        [
            "iperf3",
            "-c",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-P",
            str(streams),
            "-J",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    result = json.loads(out.stdout)
    end = result["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, end["sum_received"]["bytes"]


def wrk(port, seconds, close, pid=None):
    return wrk_url(f"http://127.0.0.1:{port}/", seconds, close, pid)


def wrk_url(url, seconds, close, pid=None):
    """(requests/s, p50 ms, p99 ms), and with `pid` the (user, system) CPU µs of its process
    tree per request: the system share is the kernel's work, which every proxy pays alike."""
    headers = ["-H", "Connection: close"] if close else []
    cpu_before = cpu_times(pid) if pid else (0, 0)
    out = subprocess.run(
        ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", *headers, url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    cpu_after = cpu_times(pid) if pid else (0, 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    per_request = (
        tuple((after - before) * 1e6 / requests for before, after in zip(cpu_before, cpu_after))
        if pid and requests
        else (None, None)
    )
    return rps, _ms(latency.get("50")), _ms(latency.get("99")), per_request


def _ms(text):
    if not text:
        return None
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def tls_connections(port, seconds):
    """New TLS connections per second routed by SNI: wrk over https with Connection: close
    does a full handshake (SNI localhost) for every request."""
    return wrk_url(f"https://{SNI}:{port}/", seconds, close=True)[0]


def idle_connections(port, target_pid, count=IDLE_CONNECTIONS):
    """RSS of the target before and with `count` idle relayed connections (bytes)."""
    before = rss_bytes(target_pid)
    sockets = []
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    try:
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(request)
            sockets.append(client)
        for client in sockets:  # every one relayed: its answer came back
            client.recv(4096)
        time.sleep(1)
        during = rss_bytes(target_pid)
    finally:
        for client in sockets:
            client.close()
    return before, during


def measure(target, seconds):
    bulk_port, http_port, tls_port = target.ports
    pid = target.process.pid if target.process else None
    figures = {}
    cpu_before = cpu_seconds(pid) if pid else 0
    figures["bulk_1_gbps"], relayed = iperf(bulk_port, 1, seconds)
    if pid:
        figures["cpu_seconds_per_gib"] = (cpu_seconds(pid) - cpu_before) / (relayed / 2**30)
    figures["bulk_8_gbps"], _ = iperf(bulk_port, 8, seconds)
    figures["close_rps"], figures["close_p50_ms"], figures["close_p99_ms"], cpu = wrk(
        http_port, seconds, close=True, pid=pid
    )
    if pid:
        user, system = cpu
        figures["cpu_us_per_connection"] = user + system
        figures["user_cpu_us_per_connection"] = user
        figures["system_cpu_us_per_connection"] = system
    figures["keepalive_rps"], _, figures["keepalive_p99_ms"], _ = wrk(http_port, seconds, False)
    figures["tls_cps"] = tls_connections(tls_port, seconds)
    if pid:
        figures["rss_idle_mib"] = rss_bytes(pid) / 2**20
        figures["pss_idle_mib"] = pss_bytes(pid) / 2**20
        figures["syscalls_per_connection"], figures["epoll_ctl_per_connection"] = (
            syscalls_per_connection(http_port, pid)
        )
        try:
            idle, loaded = idle_connections(http_port, pid)
            figures["rss_bytes_per_connection"] = (loaded - idle) / IDLE_CONNECTIONS
        except OSError as error:  # sslh-select: select() stops at 1,024 descriptors
            print(f"{target.name}: {IDLE_CONNECTIONS} idle connections failed: {error}")
            figures["rss_bytes_per_connection"] = None
    return figures


LOWER_IS_BETTER = {
    "close_p50_ms",
    "close_p99_ms",
    "keepalive_p99_ms",
    "cpu_seconds_per_gib",
    "rss_idle_mib",
    "rss_bytes_per_connection",
    "cpu_us_per_connection",
    "user_cpu_us_per_connection",
    "system_cpu_us_per_connection",
    "pss_idle_mib",
    "syscalls_per_connection",
    "epoll_ctl_per_connection",
}


def table(results):
    metrics = list(dict.fromkeys(m for figures in results.values() for m in figures))
    names = list(results)
    lines = ["| figure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        cells = []
        for name in names:
            value = results[name].get(metric)
            if value is None:
                cells.append("-")
                continue
            ratios = []
            for base in ("haproxy", "direct"):
                reference = results.get(base, {}).get(metric)
                if reference and name != base:
                    ratios.append(f"{value / reference:.2f}x {base}")
            cells.append(f"{value:,.2f}" + (f" ({', '.join(ratios)})" if ratios else ""))
        arrow = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        lines.append(f"| {metric}{arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated targets (default: all)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    parser.add_argument("--no-install", action="store_true", help="do not apt-get the peers")
    args = parser.parse_args()
    if not args.no_install:
        install_peers()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 5,000 idle connections need it
    wanted = args.only.split(",") if args.only else [t.name for t in TARGETS]
    folder = tempfile.mkdtemp(prefix="l4router-bench-")
    backends = Backends(folder)
    backends.start()
    runs = {t.name: [] for t in TARGETS if t.name in wanted}
    try:
        for run in range(args.runs):
            for kind in TARGETS:
                if kind.name not in wanted:
                    continue
                target = kind(folder, backends)
                target.start()
                try:
                    time.sleep(0.5)
                    runs[kind.name].append(measure(target, args.seconds))
                    print(f"run {run + 1} {kind.name}: {runs[kind.name][-1]}", flush=True)
                finally:
                    target.stop()
                time.sleep(1)
    finally:
        backends.stop()
    medians = {
        name: {
            metric: statistics.median(r[metric] for r in results if r.get(metric) is not None)
            if any(r.get(metric) is not None for r in results)
            else None
            for metric in results[0]
        }
        for name, results in runs.items()
    }
    args.runs_data = runs
    report(medians, args)


def report(medians, args):
    header = (
        f"{datetime.date.today()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores, median of {args.runs} runs "
        f"of {args.seconds} s; `python bench/run.py --runs {args.runs} "
        f"--seconds {args.seconds}`"
    )
    print(header + "\n\n" + table(medians))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump({"header": header, "medians": medians, "runs": args.runs_data}, out, indent=2)


if __name__ == "__main__":
    main()
