"""The Service tree: ports bound in privilegedStartService, shutdown in stages.

RouterService
 ├─ AdminService      started first, stopped last: /metrics answers while everything drains
 ├─ BackendsService   stopped after the listeners have drained
 └─ ListenersService  one ListenerService per listener: stop accepting, drain, abort the rest
"""

import gc
import socket

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from l4router.connection.addresses import host_port
from l4router.connection.reasons import Reason
from l4router.errors import BindFailed, startup_errors_in_one_line
from l4router.operate.admin import admin_site
from l4router.operate.logs import install_log_observer
from l4router.operate.runtime import RouterControl
from l4router.operate.status import ThroughputMeter
from l4router.process.reload import ConfigReloader
from l4router.process.sockets import adopt, bind_reuseport, shared_by_workers
from l4router.timers import cancel
from l4router.twisted_private import exit_zero_after_orderly_stop

log = Logger()

SAMPLE_INTERVAL = 5.0


def bind_now(reactor, description, factory):
    """Listen on an endpoint and return the port, or raise BindFailed with a one-line reason."""
    try:
        listening = serverFromString(reactor, description).listen(factory)
    except Exception as exc:  # a bad systemd index, say: raised, not returned as a failure
        raise BindFailed(f"cannot listen on {description}: {exc}") from None
    result = []
    listening.addBoth(result.append)
    if not result:
        raise BindFailed(f"cannot listen on {description}: the endpoint did not bind at once")
    outcome = result[0]
    if isinstance(outcome, Failure):
        raise BindFailed(f"cannot listen on {description}: {outcome.getErrorMessage()}")
    return outcome


def describe_address(address):
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(getattr(address, "name", address))
    return host_port(host, port)


HANDED_OVER = ("tcp", "tcp6", "udp")  # endpoint types a successor can adopt


class PortsService(Service):
    """Binds a factory on endpoint descriptions before privileges are dropped, or adopts the
    sockets a supervisor handed down for them (`inherited`: description -> fd)."""

    streams = False  # TCP clients on l4router's own Streams (l4router.connection.stream)

    def __init__(self, reactor, descriptions, factory, inherited=None):
        self.reactor = reactor
        self.descriptions = descriptions
        self.factory = factory
        self.inherited = inherited or {}
        self.ports = []

    def privilegedStartService(self):
        super().privilegedStartService()
        try:
            for description in self.descriptions:
                fd = self.inherited.get(description)
                port = (
                    self.bind(description)
                    if fd is None
                    else adopt(
                        self.reactor,
                        description,
                        fd,
                        self.factory,
                        self.streams,
                        shared=self.streams and shared_by_workers(fd),
                    )
                )
                no_delay_for_accepted(port)
                self.ports.append(port)
        except BindFailed:
            self.stop_listening()
            raise

    def bind(self, description):
        if description.split(":", 1)[0] in ("tcp", "tcp6"):
            # Bound here and adopted: Twisted shuts down the sockets it binds itself when it
            # stops listening, which would close them for a successor (l4router.process.upgrade).
            sock = bind_reuseport(description, 1, reuse_port=False)[0]
            return adopt(self.reactor, description, sock.detach(), self.factory, self.streams)
        return bind_now(self.reactor, description, self.factory)

    def addresses(self):
        return [describe_address(port.getHost()) for port in self.ports]

    def listening_fds(self):
        """{description: [fd]} of the tcp and udp sockets, for a successor
        (l4router.process.upgrade)."""
        return {
            description: [port.fileno()]
            for description, port in zip(self.descriptions, self.ports)
            if description.split(":", 1)[0] in HANDED_OVER
        }

    def stop_listening(self):
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


def no_delay_for_accepted(port):
    """TCP_NODELAY on a listening socket is inherited by every socket it accepts (Linux): set
    once here, not once per connection (a proxy must not add Nagle delays)."""
    sock = getattr(port, "socket", None)
    if (
        sock is not None
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
    ):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class AdminService(PortsService):
    def stopService(self):
        super().stopService()
        return self.stop_listening()


class ListenerService(PortsService):
    """One listener: on stop, stop accepting, wait for its connections, abort what is left."""

    streams = True

    def __init__(self, reactor, listener, factory, shutdown_timeout, inherited=None):
        super().__init__(reactor, listener.listen, factory, inherited)
        self.setName(listener.name)
        self.shutdown_timeout = shutdown_timeout

    @property
    def listener(self):
        return self.factory.listener

    def startService(self):
        super().startService()
        for address in self.addresses():
            log.info(
                "Listener {listener} accepting on {address}", listener=self.name, address=address
            )

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        yield self.stop_listening()
        connections = self.factory.connections
        if not connections:
            return
        log.info(
            "Listener {listener} draining {count} connections (at most {timeout}s)",
            listener=self.name,
            count=len(connections),
            timeout=self.shutdown_timeout,
        )
        drained = self.factory.when_drained()
        deadline = self.reactor.callLater(self.shutdown_timeout, self._abort_remaining)
        yield drained
        cancel(deadline)
        log.info("Listener {listener}: all connections done", listener=self.name)

    def _abort_remaining(self):
        connections = list(self.factory.connections)
        log.warn(
            "Listener {listener}: shutdown_timeout passed, aborting {count} connections",
            listener=self.name,
            count=len(connections),
        )
        for connection in connections:
            connection.abort(Reason.SHUTDOWN)


class ListenersService(MultiService):
    """Every listener stops accepting at once, then each drains on its own."""


class BackendsService(Service):
    """The backend groups: name resolution, health checks and warm pools run while it runs."""

    def __init__(self, groups):
        self.groups = groups

    def replace(self, groups):
        """Put new groups in place; the old ones stop their checks and pools (relays that use
        their servers keep going)."""
        old, self.groups = self.groups, groups
        if self.running:
            for group in groups.values():
                group.start()
            for group in old.values():
                group.stop()

    def startService(self):
        super().startService()
        for group in self.groups.values():
            group.start()

    def stopService(self):
        super().stopService()
        for group in self.groups.values():
            group.stop()

    def status(self):
        return [group.status() for group in self.groups.values()]


class RouterService(MultiService):
    """Starts admin, backends, listeners in that order and stops them one stage at a time.

    MultiService stops its children concurrently; shutdown must be ordered, so each stage's
    Deferred is waited for before the next stage starts stopping.
    """

    def __init__(
        self,
        reactor,
        config,
        assembly,
        backends,
        listeners,
        *,
        detectors,
        runtime,
        admin_listen,
        admin_sockets=None,
        worker=None,
        config_path=None,
        log_observer=None,
        on_started=None,
    ):
        """`worker`: this router's index under a supervisor (None when it runs alone);
        `on_started`: called once it accepts (a worker tells its supervisor, a successor its
        predecessor)."""
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.assembly = assembly
        self.backends = backends
        self.listeners = listeners
        self.log_observer = log_observer
        self.on_started = on_started
        self.draining = False
        self.throughput = ThroughputMeter(self)
        metrics = assembly.metrics
        self.reloader = ConfigReloader(self, metrics.config, detectors, config_path)
        self.control = RouterControl(self, runtime, metrics.config)  # runtime server changes
        # Called every SAMPLE_INTERVAL while running: the flush bounds what waits for a scrape.
        self.samplers = [metrics.flush]
        if worker is not None:
            self.samplers.append(metrics.watch_worker(reactor, worker).sample)
        self._sampling = []
        site = admin_site(self, self.reloader, metrics, config.admin, worker=worker is not None)
        self.admin = AdminService(reactor, admin_listen, site, admin_sockets)
        for child in (self.admin, backends, listeners):
            child.setServiceParent(self)

    @property
    def ready(self):
        """Accepting new connections: started and not shutting down."""
        return self.running and not self.draining

    def listening_fds(self):
        """{description: [fd]} of every listener's and the admin site's, for a successor."""
        fds = self.admin.listening_fds()
        for service in self.listeners:
            fds.update(service.listening_fds())
        return fds

    def setServiceParent(self, parent):
        install_log_observer(parent, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self):
        with startup_errors_in_one_line():
            super().privilegedStartService()

    def swap_in(self, config, groups, kept, started, stopped):
        """A reload's commit, the one place the running tree changes: `groups` replace the
        backends, the `kept` (service, listener) pairs take their listener's new settings,
        the `started` listener services (bound already) join and the `stopped` ones leave,
        draining as at shutdown."""
        assembly = self.assembly
        assembly.apply_limits(config)
        self.backends.replace(groups)
        if assembly.runtime.writable:
            assembly.runtime.forget_missing(config.backends)
        for service, listener in kept:
            assembly.reconfigure_factory(service.factory, listener, config, groups)
            service.shutdown_timeout = config.shutdown_timeout
        for service in stopped:
            service.disownServiceParent()
        for service in started:
            service.setServiceParent(self.listeners)
        self.config = config

    def startService(self):
        log.info(
            "l4router using config {path} (sha256 {digest})",
            path=self.config.source,
            digest=self.config.digest[:12],
        )
        for warning in self.config.warnings:
            log.warn("Config warning: {warning}", warning=warning)
        super().startService()
        self.throughput.start()
        self.reloader.install_signal_handler()
        for sampler in self.samplers:
            loop = LoopingCall(sampler)
            loop.clock = self.reactor
            loop.start(SAMPLE_INTERVAL, now=True)
            self._sampling.append(loop)
        # What start-up built lives as long as the process: kept out of the collector's
        # generations, a full collection does not walk it (a pause in the latency's tail).
        gc.freeze()
        if self.on_started is not None:
            self.on_started()

    def stopService(self):
        self.draining = True
        self.throughput.stop()
        for loop in self._sampling:
            loop.stop()
        self._sampling = []
        Service.stopService(self)
        stages = list(self)
        stages.reverse()
        done = defer.succeed(None)
        for stage in stages:
            done.addBoth(self._stop_stage, stage)
        done.addBoth(self._stopped)
        return done

    def _stopped(self, _):
        self.assembly.metrics.flush()  # a worker's last counts, into the files its supervisor reads
        log.info("l4router stopped")
        exit_zero_after_orderly_stop(self.reactor)

    @staticmethod
    def _stop_stage(_, stage):
        log.info("Stopping {stage}", stage=type(stage).__name__)
        return defer.maybeDeferred(stage.stopService).addErrback(
            lambda failure: log.failure(
                "Stopping {stage} failed", failure, stage=type(stage).__name__
            )
        )
