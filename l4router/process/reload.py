"""Hot reload (SIGHUP or the admin POST /reload): read and validate the config again, then
swap routes and backends under running listeners.

A listener whose `listen` did not change keeps its sockets, so no connection is refused
during a reload; established relays are never touched; removed listeners drain as at
shutdown. An invalid config changes nothing: the error is logged and exported.
"""

import signal

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from l4router.config import load_config
from l4router.errors import BindFailed, ConfigError, WorkerFailed

log = Logger()

# Set up once, before privileges are dropped.
UNRELOADABLE = ("admin", "logging", "state_file", "upgrade_socket")


class ConfigReloader:
    """Reloads the router in this process. `metrics` (ConfigMetrics) is None in a worker,
    whose supervisor reads the config first and exports the outcome."""

    def __init__(self, router, metrics, detectors, path=None):
        """`path`: where the config is read (a worker reads its supervisor's validated
        snapshot); by default the file the running config came from."""
        self.router = router
        self.detectors = detectors
        self.metrics = metrics
        self.path = path
        self._reloading = False
        if metrics is not None:
            metrics.loaded(router.config.digest)

    def install_signal_handler(self):
        """SIGHUP reloads; the work runs in the reactor, not in the signal handler."""
        reactor = self.router.reactor
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload))

    @defer.inlineCallbacks
    def reload(self):
        """Fires with (ok, message); the outcome is logged and exported either way."""
        if self._reloading:
            return False, "a reload is already in progress"
        self._reloading = True
        try:
            return (yield self._reload())
        finally:
            self._reloading = False

    @defer.inlineCallbacks
    def _reload(self):
        path = self.router.config.source
        log.info("Reloading the config from {path}", path=path)
        try:
            config = load_config(self.path or path, self.detectors)
            config = attrs.evolve(config, source=path)
            yield self._apply(config)
        except (ConfigError, BindFailed, WorkerFailed, defer.TimeoutError) as error:
            log.error("Reload failed, the running config stays: {error}", error=str(error))
            self._record(self.router.config, success=False)
            return False, str(error)
        self._record(config, success=True)
        log.info("Reloaded the config (sha256 {digest})", digest=config.digest[:12])
        return True, f"reloaded {path} (sha256 {config.digest[:12]})"

    def _apply(self, config):
        for key in UNRELOADABLE:
            if getattr(self.router.config, key) != getattr(config, key):
                log.warn("'{key}' changed: it takes effect at the next restart", key=key)
        return self._apply_changes(config)

    @defer.inlineCallbacks
    def _apply_changes(self, config):
        router = self.router
        assembly = router.assembly
        groups = assembly.backend_groups(config)
        running = {service.name: service for service in router.listeners}
        kept, started, stopped = [], [], []
        for listener in config.listeners:
            service = running.get(listener.name)
            if service is not None and service.listener.listen == listener.listen:
                kept.append((service, listener))
                continue
            if service is not None:
                stopped.append(service)
            started.append(assembly.listener_service(listener, config, groups))
        names = {listener.name for listener in config.listeners}
        stopped.extend(s for name, s in running.items() if name not in names)
        # Free their addresses before binding the new ones (a port closes in the next turn).
        yield defer.gatherResults([service.stop_listening() for service in stopped])
        try:
            for service in started:
                service.privilegedStartService()
        except BindFailed:
            for service in started:
                service.stop_listening()
            for service in stopped:  # put the old ones back as they were
                service.privilegedStartService()
            raise
        # Nothing can fail from here on.
        router.swap_in(config, groups, kept, started, stopped)

    def _record(self, config, success):
        if self.metrics is not None:
            self.metrics.reloaded(success, self.router.reactor.seconds())
            self.metrics.loaded(config.digest)


class WorkersReloader(ConfigReloader):
    """Reloads under a supervisor: the config is read and checked here first. Routes,
    backends and limits: every worker reloads in place (its relays untouched). New addresses
    or another number of workers: a new generation of workers replaces the old one, which
    drains (see Supervisor.replace_workers)."""

    def _apply_changes(self, config):
        old = self.router.config
        self.router.control.state.forget_missing(config.backends)  # before workers read it
        if config.workers != old.workers or _sockets(config) != _sockets(old):
            return self.router.replace_workers(config)
        self.router.write_config_snapshot(config)
        self.router.apply_limits(config)
        self.router.forward("HUP")
        self.router.config = config
        return defer.succeed(None)


def _sockets(config):
    return {description for listener in config.listeners for description in listener.listen}
