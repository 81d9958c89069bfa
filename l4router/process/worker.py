"""A worker's side of `workers: N`: it tells its supervisor when it accepts, leaves signals
to it, and stops by itself when the supervisor is gone."""

import os
import signal

from twisted.internet import abstract, error
from twisted.logger import Logger

log = Logger()

STATUS_READY = b"ready"  # the line on the status pipe that says this worker accepts


class EndWatch(abstract.FileDescriptor):
    """An fd that ends when something is gone: a worker's end of a pipe only its supervisor
    writes to (the worker then drains instead of running on as an orphan), or a process's
    pidfd (readable, and unreadable, once the process has ended)."""

    def __init__(self, reactor, fd, on_gone):
        super().__init__(reactor)
        self.fd = fd
        self.on_gone = on_gone

    def fileno(self):
        return self.fd

    def doRead(self):
        try:
            if os.read(self.fd, 64):
                return None
        except BlockingIOError:
            return None
        except OSError:
            pass
        return error.ConnectionDone()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        os.close(self.fd)
        if reason.check(error.ConnectionDone):  # not the reactor's own shutdown
            self.on_gone()


def start_worker(reactor, status_fd):
    """Called once the services have started; the rest waits for the reactor to run (it
    installs its own signal handlers first)."""
    reactor.callWhenRunning(_run_as_worker, reactor, status_fd)


def _run_as_worker(reactor, status_fd):
    """Once a worker's services run: leave Ctrl-C to the supervisor (it reaches the whole
    process group, and the supervisor stops the workers in order), take a second SIGTERM
    calmly (systemd and timeout(1) signal every process of the group, then the supervisor
    forwards its own), stop when the supervisor is gone, and tell it this worker accepts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(_stop_once, reactor))
    os.set_blocking(0, False)
    EndWatch(reactor, 0, lambda: _supervisor_gone(reactor)).startReading()
    os.write(status_fd, STATUS_READY + b"\n")
    os.close(status_fd)


def _supervisor_gone(reactor):
    log.warn("The supervisor is gone: stopping")
    _stop_once(reactor)


def _stop_once(reactor):
    try:
        reactor.stop()
    except error.ReactorNotRunning:  # already stopping
        pass
