"""The supervisor's handle on one worker: how it is started (`worker_command`), what its
status pipe says (ready, exit), and signals to it."""

import json
import os
import signal

from twisted.internet import abstract, defer, error

from l4router.process.worker import STATUS_READY, EndWatch


class WorkerProcess(abstract.FileDescriptor):
    """One worker, as its status pipe tells it: `ready` (it accepts; the worker writes it)
    and `exit STATUS` (the fork server reaped it)."""

    def __init__(self, supervisor, index, pid, status_fd, stdin_fd, admin_socket, count_file):
        super().__init__(supervisor.reactor)
        self.supervisor = supervisor
        self.index = index
        self.pid = pid
        self.status_fd = status_fd
        self.stdin_fd = stdin_fd  # the worker's stdin: it stops when this end closes
        self.admin_socket = admin_socket  # its status site, for the supervisor's views
        self.count_file = count_file  # what it holds of the shared limits
        self.ready = False
        self.ended = defer.Deferred()
        self._lines = b""

    def fileno(self):
        return self.status_fd

    def doRead(self):
        try:
            data = os.read(self.status_fd, 512)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return error.ConnectionDone()
        self._lines += data
        *lines, self._lines = self._lines.split(b"\n")
        for line in lines:
            if line == STATUS_READY and not self.ready:
                self.ready = True
                self.supervisor.worker_ready(self)
            elif line.startswith(b"exit "):
                self._exited(int(line[5:]))
        return None

    def _exited(self, status):
        """`status`: as waitpid says it, or None when nobody could learn it."""
        if self.ended.called:
            return
        code = None if status is None else os.waitstatus_to_exitcode(status)
        if code is None:
            reason = error.ProcessTerminated()
        elif code == 0:
            reason = error.ProcessDone(status)
        elif code > 0:
            reason = error.ProcessTerminated(exitCode=code, status=status)
        else:
            reason = error.ProcessTerminated(signal=-code, status=status)
        os.close(self.stdin_fd)
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(reason)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        os.close(self.status_fd)
        if self.ended.called:
            return
        # No exit line: the fork server is gone, and with it what reaps this worker and
        # could start another. Its end is watched through a pidfd instead.
        self.supervisor.fork_server_lost()
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._exited(None)
            return
        EndWatch(self.reactor, pidfd, lambda: self._exited(None)).startReading()

    def signal(self, name):
        if self.ended.called:
            return
        try:
            os.kill(self.pid, getattr(signal, f"SIG{name}"))
        except ProcessLookupError:
            pass


def worker_command(options, config_source):
    """How the supervisor starts worker `index`: twistd again (forked, see
    l4router.process.forkserver), with what it must adopt and the validated config snapshot
    (named as the file it came from)."""
    twistd = options.parent or {}
    logfile = twistd.get("logfile")

    def command(
        index,
        inherited,
        status_fd,
        admin_socket,
        config_snapshot,
        limits_index,
        count_file,
        runtime_state,
    ):
        argv = ["twistd", "--nodaemon", "--pidfile="]
        if logfile and logfile != "-":
            argv.append(f"--logfile={logfile}.worker-{index}")
        argv += [
            "l4router",
            "-c",
            config_snapshot,
            "--config-source",
            config_source,
            "--worker",
            str(index),
            "--sockets",
            json.dumps(inherited),
            "--status-fd",
            str(status_fd),
            "--admin-socket",
            admin_socket,
            "--limits-index",
            limits_index,
            "--count-file",
            count_file,
            "--runtime-state",
            runtime_state,
        ]
        # systemd's LISTEN_* are the supervisor's: its workers get their sockets from it.
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        return argv, environment

    return command
