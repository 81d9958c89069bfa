"""`twistd l4router`: command-line options and the assembly of the Service tree."""

import sys

# l4router never speaks TLS itself (it relays TLS; it listens and serves its admin site on
# plain sockets), but Twisted's TCP support loads pyOpenSSL for startTLS when it can, and with
# it cryptography's bindings: ~12 MiB more in the supervisor. Unless something loaded it
# already, it is made unavailable, before the imports below reach twisted.internet.tcp.
sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]  # None: "cannot import"

import json
from importlib import resources

import attrs
from twisted.python import usage

from l4router.backends.control import RuntimeState
from l4router.backends.transparent import check_transparent_allowed
from l4router.config import load_config
from l4router.detection.registry import installed_detectors
from l4router.errors import ConfigError
from l4router.operate.logs import make_log_observer
from l4router.process.assembly import RouterAssembly
from l4router.process.forkserver import ForkServer, Startup, inherited_startup
from l4router.process.reactor import install_unless_chosen
from l4router.process.service import BackendsService, ListenersService, RouterService
from l4router.process.shared_limits import WorkerLimits
from l4router.process.supervisor import Supervisor
from l4router.process.upgrade import UpgradeService, take_over
from l4router.process.worker import start_worker
from l4router.process.worker_handle import worker_command


def quickstart_config_path():
    """The packaged quickstart config, used when no -c is given."""
    return str(resources.files("l4router") / "quickstart.yaml")


class Options(usage.Options):
    synopsis = "[-c CONFIG] [--check]"
    longdesc = (
        "Runs the l4router protocol router. It peeks at the first bytes of each client, detects "
        "the protocol (TLS SNI/ALPN, HTTP/1 Host/path, ...), picks a route and a backend, and "
        "relays bytes both ways. Without -c it runs the packaged quickstart config. "
        "Use twistd's own options for process management: -n (stay in the foreground), "
        "--pidfile, --logfile, --uid/--gid (ports are bound before privileges are dropped)."
    )
    optParameters = [
        ["config", "c", None, "The YAML config file (default: the packaged quickstart.yaml)."],
        # Set by the supervisor when it starts a worker (`workers:` in the config):
        ["worker", None, None, "(internal) Run as worker N of a supervisor.", int],
        ["sockets", None, "{}", "(internal) JSON: listen description -> inherited fd."],
        ["status-fd", None, None, "(internal) The fd to announce readiness on.", int],
        ["admin-socket", None, None, "(internal) The UNIX socket of the worker's status site."],
        ["config-source", None, None, "(internal) The file the -c snapshot was validated from."],
        ["limits-index", None, None, "(internal) The supervisor's index of shared limits."],
        ["count-file", None, None, "(internal) Where the worker counts what it holds of them."],
        ["runtime-state", None, None, "(internal) The supervisor's runtime changes to servers."],
    ]
    optFlags = [
        [
            "check",
            None,
            "Validate the config, print every error with its key path, and exit "
            "(0: valid, 2: invalid) without binding anything.",
        ],
        [
            "list-detectors",
            None,
            "List the installed detectors (name, transports, priority, "
            "fields) in the order they are asked, and exit.",
        ],
    ]

    def postOptions(self):
        install_unless_chosen()
        inherited = inherited_startup()
        self.detectors = inherited.detectors if inherited else installed_detectors()
        if self["list-detectors"]:
            sys.stdout.write(describe_detectors(self.detectors))
            raise SystemExit(0)
        path = self["config"] or quickstart_config_path()
        try:
            self.loaded = load_config(path, self.detectors, inherited and inherited.config)
            if self["config-source"]:
                self.loaded = attrs.evolve(self.loaded, source=self["config-source"])
        except ConfigError as error:
            sys.stderr.write(f"l4router: invalid config {path}:\n")
            for key, reason in error.problems:
                sys.stderr.write(f"  {key}: {reason}\n")
            raise SystemExit(2)
        for warning in self.loaded.warnings:
            sys.stderr.write(f"l4router: warning: {warning}\n")
        transparent = [name for name, b in self.loaded.backends.items() if b.transparent]
        why = transparent and not self["check"] and check_transparent_allowed()
        if transparent and (self.parent or {}).get("uid") is not None:
            why = "--uid drops CAP_NET_ADMIN, which transparent mode needs while it runs"
        if why:
            sys.stderr.write(f"l4router: backends.{transparent[0]}.transparent: {why}\n")
            raise SystemExit(2)
        if self["check"]:
            sys.stdout.write(
                f"l4router: {path} is valid: {len(self.loaded.listeners)} "
                f"listeners, {len(self.loaded.backends)} backends\n"
            )
            raise SystemExit(0)


def describe_detectors(detectors):
    """A table of the installed detectors, in the order the decision loop asks them."""
    rows = [("NAME", "TRANSPORTS", "PRIORITY", "FIELDS")]
    for detector in sorted(detectors, key=lambda d: (d.priority, d.name)):
        fields = detector.fields
        rows.append(
            (
                detector.name,
                ",".join(sorted(detector.transports)),
                str(detector.priority),
                ", ".join(fields) if fields is not None else "(not declared)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}\n" for r in rows
    )


def makeService(options):
    from twisted.internet import reactor

    twistd = options.parent or {}
    config = options.loaded
    worker = options["worker"]
    observer = make_log_observer(
        config.logging, twistd.get("logfile"), twistd.get("nodaemon", True), worker=worker
    )
    if worker is not None:
        return build_worker(
            config,
            options.detectors,
            reactor,
            worker,
            json.loads(options["sockets"]),
            options["status-fd"],
            options["admin-socket"],
            observer,
            options["config"],
            WorkerLimits(options["limits-index"], options["count-file"]),
            RuntimeState(options["runtime-state"], writable=False),
        )
    takeover = take_over(config.upgrade_socket)  # a running predecessor's sockets, if any
    if takeover is not None:
        takeover.close_unused(_listen_descriptions(config))
    if config.workers > 1:
        # Forked now, before twistd begins logging or runs the reactor.
        fork_server = ForkServer.start(
            Startup(options.detectors, config, list(getattr(twistd, "loadedPlugins", {}).values())),
            twistd.get("uid"),
            twistd.get("gid"),
            twistd.get("euid", False),
        )
        supervisor = Supervisor(
            reactor,
            config,
            options.detectors,
            worker_command(options, config.source),
            fork_server,
            observer,
            takeover,
        )
        return with_upgrade_socket(supervisor, config, reactor)
    router = build_router(
        config,
        options.detectors,
        reactor,
        log_observer=observer,
        inherited_sockets=takeover and takeover.first_of_each(),
        on_started=takeover and takeover.ready,
    )
    return with_upgrade_socket(router, config, reactor)


def _listen_descriptions(config):
    return {d for listener in config.listeners for d in listener.listen} | set(config.admin.listen)


def with_upgrade_socket(top, config, reactor):
    """With `upgrade_socket`, the top service (a router or a supervisor) also serves it
    (l4router.process.upgrade), handing over what it listens on."""
    if config.upgrade_socket is not None:
        UpgradeService(
            reactor, config.upgrade_socket, top.listening_fds, reactor.stop
        ).setServiceParent(top)
    return top


def build_worker(
    config,
    detectors,
    reactor,
    index,
    sockets,
    status_fd,
    admin_socket,
    log_observer,
    config_path=None,
    shared_limits=None,
    runtime=None,
):
    """Worker `index`: the router on the sockets its supervisor handed down, its status site
    on a UNIX socket only the supervisor asks."""
    return build_router(
        config,
        detectors,
        reactor,
        log_observer=log_observer,
        inherited_sockets=sockets,
        worker=index,
        admin_listen=(f"unix:{admin_socket}",),
        config_path=config_path,
        shared_limits=shared_limits,
        runtime=runtime,
        on_started=lambda: start_worker(reactor, status_fd),
    )


def build_router(
    config,
    detectors,
    reactor,
    registry=None,
    log_observer=None,
    inherited_sockets=None,
    worker=None,
    admin_listen=None,
    config_path=None,
    shared_limits=None,
    runtime=None,
    on_started=None,
):
    """Build (not start) the whole Service tree for `config`; in a worker, on inherited
    sockets, without the config metrics (the supervisor's), the admin site on `admin_listen`."""
    if runtime is None:
        runtime = RuntimeState(config.state_file)
    assembly = RouterAssembly(
        reactor,
        detectors,
        registry,
        inherited_sockets,
        standalone=worker is None,
        shared_limits=shared_limits,
        runtime=runtime,
    )
    assembly.apply_limits(config)
    groups = assembly.backend_groups(config)
    listeners = ListenersService()
    for listener in config.listeners:
        assembly.listener_service(listener, config, groups).setServiceParent(listeners)
    return RouterService(
        reactor,
        config,
        assembly,
        BackendsService(groups),
        listeners,
        detectors=detectors,
        runtime=runtime,
        admin_listen=config.admin.listen if admin_listen is None else admin_listen,
        admin_sockets=inherited_sockets if worker is None else None,
        worker=worker,
        config_path=config_path,
        log_observer=log_observer,
        on_started=on_started,
    )
