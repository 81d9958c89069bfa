"""Workers forked from a copy of the supervisor that has imported everything.

A fresh interpreter per worker costs ~38 MiB of pages no other process shares. Forked
children share the pages of the process they came from until they write to them, so the
supervisor forks one *fork server* as soon as its options are parsed (everything imported,
the config loaded, no logging begun, no reactor running) and asks it for each worker. The fork
server never runs a reactor: it waits on a socket for requests, forks, and reports each
worker's pid and exit status on a pipe the supervisor reads.

Each worker also inherits what the supervisor found at start-up (`inherited_startup`): twistd's
plugins, the installed detectors and the parsed config. Walking the plugin caches and parsing
the config again would copy pages of the shared heap into every worker (reference counts
and caches are written as they are read: 1.3 MiB of a worker's 10.5 private, measured); a
worker uses the inherited objects instead, the config when its text is the one the
supervisor parsed (the config is frozen; the detectors are the ones it was checked against).

A request carries the worker's argv and environment and the fds it must see (SCM_RIGHTS):
its stdin/stdout/stderr, its listening sockets and its status pipe; the answer is its pid.
The status pipe is also where the fork server writes `exit STATUS` once it has reaped the
worker (after the worker's own `ready`), so that the supervisor learns a worker's life from
one pipe.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys
from typing import Any

import attrs

from l4router.config.model import Config
from l4router.errors import WorkerFailed
from l4router.twisted_private import only_these_service_makers

_MAX_FDS = 64  # stdio, a status pipe and one socket per listen address
_MAX_REQUEST = 1 << 20


@attrs.frozen
class Startup:
    """What the supervisor found before it forked the fork server."""

    detectors: list[Any]
    config: Config
    service_makers: list[Any]  # twistd's subcommands (its plugins), l4router's among them


_startup: Startup | None = None  # set in the fork server, and so in every worker it forks


def inherited_startup() -> Startup | None:
    """In a worker forked from the fork server: the supervisor's detectors and config."""
    return _startup


class ForkServer:
    """The supervisor's side: one request per worker, answered with the worker's pid."""

    def __init__(self, pid: int, control: socket.socket):
        self.pid = pid
        self.control = control
        self.lost = False  # it ended before the supervisor did

    @classmethod
    def start(
        cls, startup: Startup, uid: int | None = None, gid: int | None = None, euid: bool = False
    ) -> ForkServer:
        """Fork the server now, keeping `startup` for the workers. `uid`/`gid`/`euid`:
        twistd's, which the supervisor drops to only after binding; the fork server binds
        nothing and drops them at once."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the children would print the parent's buffered output again
        gc.collect()
        gc.freeze()  # the collector then leaves these objects (and their pages) untouched
        pid = os.fork()
        if pid == 0:
            global _startup
            _startup = startup
            code = 1
            try:
                ours.close()
                code = _serve(theirs, uid, gid, euid)
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def spawn(
        self, argv: list[str], environment: dict[str, str], fds: dict[int, int], status_fd: int
    ) -> int:
        """Fork a worker that sees `fds` ({number in the worker: fd here}) and runs twistd
        with `argv`; `status_fd` (one of them) gets the `exit` line. The pid."""
        numbers = list(fds)
        request = json.dumps(
            {"argv": argv, "env": environment, "fds": numbers, "status": numbers.index(status_fd)}
        ).encode()
        try:
            socket.send_fds(self.control, [request], [fds[n] for n in numbers])
            answer = self.control.recv(64)
        except OSError as exc:
            raise WorkerFailed(f"the fork server is gone: {exc}") from None
        if not answer.startswith(b"pid "):
            raise WorkerFailed(f"the fork server could not fork: {answer.decode(errors='replace')}")
        return int(answer[4:])

    def stop(self) -> None:
        """Closing the socket ends the fork server (its workers are not its to stop)."""
        self.control.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(control: socket.socket, uid: int | None, gid: int | None, euid: bool) -> int:
    """The fork server's loop: requests in, workers out, exits reported, until the supervisor
    closes the socket. SIGCHLD wakes it through a pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    _close_all_but(control.fileno())
    _forget_the_reactor()
    if uid is not None or gid is not None:
        from twisted.python.util import switchUID

        switchUID(uid, gid, euid)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status_pipes: dict[int, int] = {}  # worker pid -> the write end of its status pipe
    while True:
        try:
            readable, _, _ = select.select([control.fileno(), wake_read], [], [])
        except InterruptedError:
            continue
        if wake_read in readable:
            os.read(wake_read, 512)
        _reap(status_pipes)
        if control.fileno() in readable:
            try:
                request, fds, _, _ = socket.recv_fds(control, _MAX_REQUEST, _MAX_FDS)
            except OSError:
                return 0
            if not request:
                return 0  # the supervisor is gone or done
            _fork_worker(control, json.loads(request), fds, status_pipes)


def _fork_worker(
    control: socket.socket, request: dict, fds: list[int], status_pipes: dict[int, int]
) -> None:
    """Fork one worker; keep its status pipe to report its exit on."""
    try:
        pid = os.fork()
    except OSError as exc:
        control.send(f"error {exc}".encode())
        for fd in fds:
            os.close(fd)
        return
    if pid == 0:
        code = 1
        try:
            code = _become_worker(request, fds, control)
        finally:
            os._exit(code)
    status = fds.pop(request["status"])
    for fd in fds:
        os.close(fd)
    status_pipes[pid] = status
    control.send(f"pid {pid}".encode())


def _reap(status_pipes: dict[int, int]) -> None:
    while status_pipes:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        pipe = status_pipes.pop(pid, None)
        if pipe is not None:
            _write(pipe, f"exit {status}\n")
            os.close(pipe)


def _write(fd: int, line: str) -> None:
    try:
        os.write(fd, line.encode())
    except OSError:
        pass  # the supervisor closed its end: nobody is waiting for this line


def _become_worker(request: dict, fds: list[int], control: socket.socket) -> int:
    """In the forked worker: the fds where twistd expects them, the worker's environment and
    argv, then twistd as if freshly started. Returns the exit code."""
    control.close()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    targets = request["fds"]
    # Move everything above the highest target first, so that no dup2 overwrites a source.
    high = max(targets + fds) + 1
    moved = [os.dup2(fd, high + i, inheritable=False) for i, fd in enumerate(fds)]
    for fd in fds:
        os.close(fd)
    for target, fd in zip(targets, moved):
        os.dup2(fd, target, inheritable=True)
    _close_all_but(*targets)
    os.environ.clear()
    os.environ.update(request["env"])
    _metrics_per_process()
    gc.enable()
    sys.argv = request["argv"]
    if _startup is not None:
        only_these_service_makers(_startup.service_makers)
    from twisted.scripts.twistd import run

    try:
        run()
    except SystemExit as exit:
        if isinstance(exit.code, str):
            sys.stderr.write(exit.code + "\n")
            return 1
        return exit.code or 0
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return 0


def _close_all_but(*keep: int) -> None:
    """Every inherited fd closed but stdio and `keep`: the supervisor's reactor, sockets and
    admin site are not the fork server's (nor a worker's) to hold open."""
    highest = os.sysconf("SC_OPEN_MAX")
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, highest)


def _forget_the_reactor() -> None:
    """The supervisor installed (not started) a reactor before forking: a worker installs its
    own, so that module entry must go (its epoll fd was closed with the rest)."""
    import twisted.internet

    sys.modules.pop("twisted.internet.reactor", None)
    twisted.internet.__dict__.pop("reactor", None)


def _metrics_per_process() -> None:
    """prometheus-client picks its value store when imported, by PROMETHEUS_MULTIPROC_DIR;
    the supervisor imported it without, the worker has it: pick again."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
