"""`workers: N`: N router processes under one supervising twistd (the worker's own side is
l4router.process.worker).

The supervisor binds every listener's sockets (one SO_REUSEPORT socket per worker, see
l4router.process.sockets) and the admin site, then starts the workers: `twistd -n l4router`
processes that adopt their sockets and run the router. It restarts a worker that dies (on the same
sockets), forwards reloads, and on SIGTERM stops the workers (each drains as a single router
does) before it stops itself. Metrics are written by the workers into a shared directory and
summed by the supervisor's /metrics (prometheus-client's multiprocess mode).
"""

import os
import shutil
import socket
import tempfile

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, multiprocess
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from l4router.backends.control import RuntimeState
from l4router.errors import WorkerFailed, startup_errors_in_one_line
from l4router.operate.admin import supervisor_site
from l4router.operate.logs import install_log_observer
from l4router.operate.metrics import ConfigMetrics
from l4router.operate.runtime import SupervisorControl
from l4router.operate.worker_status import WorkerStatus
from l4router.process.reload import WorkersReloader
from l4router.process.service import AdminService
from l4router.process.shared_limits import LimitTable
from l4router.process.sockets import close_unused, sockets_per_worker
from l4router.process.worker_handle import WorkerProcess
from l4router.timers import cancel
from l4router.twisted_private import exit_zero_after_orderly_stop

log = Logger()

RESTART_BACKOFF = (0.5, 10.0)  # first delay, longest delay between restarts of one worker
KILL_GRACE = 5.0  # after shutdown_timeout, a worker that has not exited is killed
READY_TIMEOUT = 30.0  # a reload's new generation of workers must be accepting by then


class Supervisor(MultiService):
    """The parent process: sockets, workers, the admin site, reloads, ordered shutdown."""

    def __init__(
        self,
        reactor,
        config,
        detectors,
        worker_command,
        fork_server,
        log_observer=None,
        takeover=None,
    ):
        """`worker_command`: index, sockets, status fd, ... -> (argv, env) of a worker;
        `fork_server`: l4router.process.forkserver, where workers come from; `takeover`:
        l4router.process.upgrade.Takeover, a predecessor's sockets, kept instead of bound."""
        super().__init__()
        self.reactor = reactor
        self.fork_server = fork_server
        self.takeover = takeover
        self.log_observer = log_observer
        self.config = config
        self.worker_command = worker_command
        self.sockets = {}  # listen description -> one socket per worker
        self.workers = {}  # index -> WorkerProcess (the current one)
        self.retiring = []  # workers of an older generation, draining after a reload
        self.generation = 0  # a reload that changes sockets starts a new one
        self._replacing = None  # fires once a new generation is ready
        self.restarts = {}  # index -> restarts in a row without a ready worker
        self.run_dir = None  # the workers' metric files and admin sockets
        self.limits = None  # LimitTable: the limits the workers share
        self.draining = False
        self.started_all = False
        self.registry = CollectorRegistry()
        self.workers_ready = Gauge(
            "l4router_workers_ready", "Worker processes accepting.", registry=self.registry
        )
        self.workers_configured = Gauge(
            "l4router_workers", "Worker processes configured.", registry=self.registry
        )
        self.worker_exits = Counter(
            "l4router_worker_exits",
            "Workers that ended unexpectedly and were restarted.",
            ["worker"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)  # the supervisor's own process_* metrics
        config_metrics = ConfigMetrics(self.registry)
        self.reloader = WorkersReloader(self, config_metrics, detectors)
        self.control = SupervisorControl(  # runtime changes to servers
            self, RuntimeState(config.state_file), config_metrics, WorkerStatus(reactor, self)
        )
        admin_sockets = takeover.take(config.admin.listen) if takeover is not None else None
        self.admin = AdminService(
            reactor,
            config.admin.listen,
            supervisor_site(self, self.reloader, config.admin),
            admin_sockets,
        )
        self.admin.setServiceParent(self)

    @property
    def metrics_dir(self):
        return os.path.join(self.run_dir, "metrics")

    @property
    def config_snapshot(self):
        """The validated config text the workers read (at start, restart and reload), so that
        no worker ever runs a file that changed after the supervisor checked it."""
        return os.path.join(self.run_dir, "config.yaml")

    def write_config_snapshot(self, config):
        partial = self.config_snapshot + ".new"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the token
        with os.fdopen(fd, "wb") as stream:
            stream.write(config.text)
        os.replace(partial, self.config_snapshot)

    def all_accepting(self):
        return len(self.workers) == self.config.workers and all(
            worker.ready for worker in self.workers.values()
        )

    @property
    def ready(self):
        """For /readyz: every worker accepts (while a reload replaces them, the old ones do)."""
        return (
            self.running
            and not self.draining
            and (self.all_accepting() or self._replacing is not None)
        )

    def setServiceParent(self, parent):
        install_log_observer(parent, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self):
        if self.takeover is not None:  # a predecessor's sockets: kept, not bound again
            self.sockets = {
                description: [socket.socket(fileno=fd) for fd in fds]
                for description, fds in self.takeover.sockets.items()
            }
        with startup_errors_in_one_line():
            self.sockets = sockets_per_worker(self.config, self.sockets)
            super().privilegedStartService()

    def listening_fds(self):
        """{description: [fd per worker]} and the admin site's, for a successor."""
        fds = {
            description: [s.fileno() for s in group] for description, group in self.sockets.items()
        }
        fds.update(self.admin.listening_fds())
        return fds

    def apply_limits(self, config):
        for key in self.limits.apply(config):
            log.warn(
                "The limit of {key} changes between limited and unlimited: that takes "
                "effect at the next restart",
                key=key,
            )

    def startService(self):
        log.info(
            "l4router using config {path} (sha256 {digest}) with {count} workers",
            path=self.config.source,
            digest=self.config.digest[:12],
            count=self.config.workers,
        )
        for warning in self.config.warnings:
            log.warn("Config warning: {warning}", warning=warning)
        super().startService()
        self.run_dir = tempfile.mkdtemp(prefix="l4router-")
        os.mkdir(self.metrics_dir)
        self.write_config_snapshot(self.config)
        runtime = self.control.state
        if runtime.path is None:  # no state_file: the workers read the changes from here
            runtime.path = os.path.join(self.run_dir, "runtime.json")
        runtime.save()
        self.limits = LimitTable(self.run_dir, self.reactor)
        self.apply_limits(self.config)
        multiprocess.MultiProcessCollector(self.registry, path=self.metrics_dir)
        self.workers_configured.set(self.config.workers)
        for index in range(self.config.workers):
            self.spawn(index)
        self.reloader.install_signal_handler()

    def spawn(self, index):
        sockets = {
            description: per_worker[index].fileno()
            for description, per_worker in self.sockets.items()
        }
        stdin_read, stdin_write = os.pipe()  # closed by us: the worker stops (EndWatch)
        status_read, status_write = os.pipe()
        # The child sees its sockets as fds 3, 4, ...; then the status pipe.
        child_fds = {0: stdin_read, 1: 1, 2: 2}
        inherited = {}
        for number, (description, fd) in enumerate(sockets.items(), start=3):
            child_fds[number] = fd
            inherited[description] = number
        status_fd = 3 + len(inherited)
        child_fds[status_fd] = status_write
        admin_socket = os.path.join(self.run_dir, f"worker-{self.generation}-{index}.sock")
        count_file = self.limits.count_file(self.generation, index)
        argv, env = self.worker_command(
            index,
            inherited,
            status_fd,
            admin_socket,
            self.config_snapshot,
            self.limits.index_path,
            count_file,
            self.control.state.path,
        )
        env = dict(env, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
        try:
            pid = self.fork_server.spawn(argv, env, child_fds, status_fd)
        except WorkerFailed:
            os.close(stdin_write)
            os.close(status_read)
            raise
        finally:
            os.close(stdin_read)
            os.close(status_write)
        os.set_blocking(status_read, False)
        worker = WorkerProcess(self, index, pid, status_read, stdin_write, admin_socket, count_file)
        worker.startReading()
        self.workers[index] = worker
        log.info("Worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def worker_ready(self, worker):
        self.restarts[worker.index] = 0
        self._count_ready()
        if self.all_accepting() and (not self.started_all or self._replacing is not None):
            self.started_all = True
            log.info("All {count} workers accepting", count=len(self.workers))
            if self.takeover is not None:
                self.takeover.ready()  # the predecessor stops and drains
                self.takeover = None
            if self._replacing is not None:
                self._replacing.callback(None)

    def _count_ready(self):
        self.workers_ready.set(sum(w.ready for w in self.workers.values()))

    def worker_ended(self, worker, reason):
        if worker.pid is not None:
            multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        if os.path.exists(worker.admin_socket):  # a killed worker leaves it behind
            os.unlink(worker.admin_socket)
        self.limits.worker_gone(worker.count_file)
        if worker in self.retiring:
            self.retiring.remove(worker)
        current = self.workers.get(worker.index) is worker
        if current:
            del self.workers[worker.index]
        self._count_ready()
        if self.draining or not current:
            return
        code = getattr(reason, "exitCode", None)
        how = f"signal {reason.signal}" if getattr(reason, "signal", None) else f"exit {code}"
        if self._replacing is not None and not worker.ready:
            self._replacing.errback(
                WorkerFailed(
                    f"worker {worker.index} of the new generation ended ({how}) before it was ready"
                )
            )
            return
        if not self.started_all and not worker.ready and not getattr(reason, "signal", None):
            # It exited by itself before accepting: a broken install or config, which a
            # restart would only repeat. (One killed by a signal while it started, the OOM
            # killer's or an operator's, is restarted like any other.)
            log.critical(
                "Worker {index} ended ({how}) before it was ready: stopping",
                index=worker.index,
                how=how,
            )
            self.reactor.callLater(0, self.reactor.stop)
            return
        self.worker_exits.labels(str(worker.index)).inc()
        failures = self.restarts.get(worker.index, 0)
        self.restarts[worker.index] = failures + 1
        delay = min(RESTART_BACKOFF[0] * 2**failures, RESTART_BACKOFF[1])
        log.warn(
            "Worker {index} (pid {pid}) ended ({how}); restarting it in {delay}s",
            index=worker.index,
            pid=worker.pid,
            how=how,
            delay=delay,
        )
        self.reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index):
        if self.running and not self.draining and index not in self.workers:
            try:
                self.spawn(index)
            except WorkerFailed as failure:
                log.critical("{failure}: stopping", failure=str(failure))
                self.reactor.stop()

    def fork_server_lost(self):
        if not self.draining and not self.fork_server.lost:
            self.fork_server.lost = True
            log.critical("The fork server is gone: no worker could be started again; stopping")
            self.reactor.stop()

    def forward(self, signal_name):
        for worker in self.workers.values():
            worker.signal(signal_name)

    @defer.inlineCallbacks
    def replace_workers(self, config):
        """A reload that changes addresses or the number of workers: a new generation of
        workers on the new sockets; once every one accepts, the old generation stops (drains
        its relays up to shutdown_timeout). If the new one does not get ready, it is stopped
        and the old one goes on."""
        sockets = sockets_per_worker(config, self.sockets)
        old = (self.config, self.sockets, self.workers)
        retired = list(old[2].values())
        self.retiring.extend(retired)  # so that a stop meanwhile stops them too
        self.generation += 1
        self.config, self.sockets, self.workers = config, sockets, {}
        self._replacing = defer.Deferred().addTimeout(READY_TIMEOUT, self.reactor)
        try:
            self.write_config_snapshot(config)
            self.apply_limits(config)
            for index in range(config.workers):
                self.spawn(index)
            yield self._replacing
        except Exception:
            for worker in self.workers.values():
                worker.signal("KILL")
            close_unused(sockets, old[1])
            self.config, self.sockets, self.workers = old
            self.write_config_snapshot(self.config)
            self.apply_limits(self.config)
            self.retiring = [w for w in self.retiring if w not in retired]
            for index, worker in list(self.workers.items()):
                if worker.ended.called:  # died meanwhile, when it was not current
                    del self.workers[index]
                    self.reactor.callLater(0, self._respawn, index)
            self._count_ready()
            raise
        finally:
            self._replacing = None
        self.workers_configured.set(config.workers)
        log.info(
            "Generation {generation} accepting; {count} older workers drain and stop",
            generation=self.generation,
            count=len(retired),
        )
        for worker in retired:
            worker.signal("TERM")
        close_unused(old[1], sockets)

    @defer.inlineCallbacks
    def stopService(self):
        """Workers first (they drain), then the sockets, then the admin site."""
        self.draining = True
        log.info("Stopping {count} workers", count=len(self.workers))
        workers = list(self.workers.values()) + self.retiring
        for worker in workers:
            worker.signal("TERM")
        # The workers' own copies close as they stop accepting; from then on the kernel
        # refuses new connections instead of queueing them for nobody.
        self.close_sockets()
        deadline = self.reactor.callLater(
            self.config.shutdown_timeout + KILL_GRACE, self._kill, workers
        )
        yield defer.DeferredList([worker.ended for worker in workers])
        cancel(deadline)
        log.info("All workers stopped")
        yield defer.maybeDeferred(super().stopService)
        if self.limits is not None:
            self.limits.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.fork_server.stop()
        log.info("l4router stopped")
        exit_zero_after_orderly_stop(self.reactor)

    def _kill(self, workers):
        for worker in workers:
            if not worker.ended.called:
                log.warn(
                    "Worker {index} (pid {pid}) did not stop in time: killed",
                    index=worker.index,
                    pid=worker.pid,
                )
                worker.signal("KILL")

    def close_sockets(self):
        sockets, self.sockets = self.sockets, {}
        close_unused(sockets, {})
