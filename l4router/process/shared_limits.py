"""Process-wide and per-listener limits shared exactly by a supervisor's workers.

Each finite limit is a named POSIX semaphore that the supervisor creates with the limit as
its value; a worker admits a connection by taking one (sem_trywait, no system call when it
succeeds or fails) and gives it back when the connection ends (sem_post). So `max_connections:
5` admits exactly 5 in all, whichever workers the kernel hands the connections to.

A worker that dies cannot give back what it held. Each worker therefore also keeps its own
count per limit in a small file of the supervisor's run directory (plain stores into shared
memory, one writer each); when it dies, the supervisor gives back what that file says and
starts its successor with a fresh file.

`limits.json` in the run directory names the semaphores and the slot of each limit in those
files; the supervisor rewrites it (atomically) before a reload reaches the workers.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
from typing import Any

from twisted.logger import Logger

from l4router.timers import cancel

try:
    import _multiprocessing
except ImportError:  # an interpreter without POSIX semaphores: workers share no limits
    _multiprocessing = None

log = Logger()

SEMAPHORE = 1  # _multiprocessing's kind for a counting semaphore
MAX_VALUE = 2**30
MAX_LIMITS = 512  # slots in a worker's count file
SLOT = 8  # bytes: a signed 64-bit count
PROCESS = "process"
DEBT_RETRY = 0.5  # seconds between attempts to take back permits of a lowered limit


def listener_key(name: str) -> str:
    return f"listener:{name}"


def route_key(listener: str, route: str) -> str:
    return f"route:{listener}/{route}"


def backend_key(name: str) -> str:
    return f"backend:{name}"


def limit_keys(config) -> dict[str, int | None]:
    """{key: maximum or None} of every limit `config` could have that workers share."""
    limits = {PROCESS: config.max_connections}
    for listener in config.listeners:
        limits[listener_key(listener.name)] = listener.max_connections
        for route in listener.routes:
            limits[route_key(listener.name, route.label)] = route.max_connections
    for name, backend in config.backends.items():
        limits[backend_key(name)] = backend.max_connections
    return limits


def wanted_limits(config) -> dict[str, int]:
    """{key: maximum} of the finite limits of `config` that workers share."""
    return {key: maximum for key, maximum in limit_keys(config).items() if maximum is not None}


class LimitTable:
    """The supervisor's side: creates the semaphores, gives back what dead workers held."""

    def __init__(self, run_dir: str, clock):
        self.run_dir = run_dir
        self.clock = clock
        self.prefix = f"/l4router-{os.getpid()}-{secrets.token_hex(4)}"
        self.semaphores: dict[str, Any] = {}  # key -> _multiprocessing.SemLock
        self.maximum: dict[str, int] = {}  # key -> the value it was created or adjusted to
        self.slots: dict[str, int] = {}  # key -> slot index in the workers' count files
        self.debt: dict[str, int] = {}  # key -> permits to take back after a limit was lowered
        self.running: set[str] = set()  # keys of what workers have run
        self._retry = None

    @property
    def index_path(self) -> str:
        return os.path.join(self.run_dir, "limits.json")

    def count_file(self, generation: int, index: int) -> str:
        """A fresh, zeroed count file for a worker about to start."""
        path = os.path.join(self.run_dir, f"held-{generation}-{index}")
        with open(path, "wb") as stream:
            stream.truncate(MAX_LIMITS * SLOT)
        return path

    def apply(self, config) -> list[str]:
        """Create or adjust the semaphores for `config`; write the index the workers read.
        Returns the keys whose change waits for a restart: a limit added to, or removed
        from, a listener, route or backend that already runs (its open connections hold no
        permits, or would have to give back to nothing)."""
        wanted = wanted_limits(config)
        present = set(limit_keys(config))
        restart_needed = []
        for key in sorted(present):
            maximum = wanted.get(key)
            shared = key in self.semaphores
            if maximum is None and not shared:
                continue
            if maximum is None or (not shared and key in self.running):
                restart_needed.append(key)  # turned off, or on under running connections
            elif not shared:
                self._create(key, maximum)
            elif maximum != self.maximum[key]:
                self._adjust(key, maximum)
        self.running |= present
        self._write_index()
        return restart_needed

    def _create(self, key, maximum):
        if _multiprocessing is None:
            raise OSError("no POSIX semaphores in this Python: workers cannot share limits")
        name = f"{self.prefix}-{len(self.slots)}"
        self.semaphores[key] = _multiprocessing.SemLock(SEMAPHORE, maximum, MAX_VALUE, name, False)
        self.slots[key] = len(self.slots)
        self.maximum[key] = maximum

    def _adjust(self, key, maximum):
        delta = maximum - self.maximum[key]
        self.maximum[key] = maximum
        if delta > 0:
            owed = self.debt.pop(key, 0)
            for _ in range(max(0, delta - owed)):
                self.semaphores[key].release()
            if owed > delta:
                self.debt[key] = owed - delta
        else:
            self.debt[key] = self.debt.get(key, 0) - delta
        self._collect_debt()

    def _collect_debt(self):
        """Take back the permits of lowered limits as connections give them back."""
        self._retry = None
        for key, owed in list(self.debt.items()):
            while owed and self.semaphores[key].acquire(False):
                owed -= 1
            if owed:
                self.debt[key] = owed
            else:
                del self.debt[key]
        if self.debt:
            self._retry = self.clock.callLater(DEBT_RETRY, self._collect_debt)

    def _write_index(self):
        index = {
            key: {"semaphore": sem.name, "slot": self.slots[key], "maximum": self.maximum[key]}
            for key, sem in self.semaphores.items()
        }
        partial = self.index_path + ".new"
        with open(partial, "w") as stream:
            json.dump(index, stream)
        os.replace(partial, self.index_path)

    def worker_gone(self, count_file: str) -> None:
        """Give back every permit the dead worker held, then forget its file."""
        try:
            with open(count_file, "rb") as stream:
                counts = memoryview(stream.read()).cast("q")
        except OSError:
            return
        for key, slot in self.slots.items():
            for _ in range(max(0, counts[slot])):
                self.semaphores[key].release()
        os.unlink(count_file)

    def close(self) -> None:
        cancel(self._retry)
        for sem in self.semaphores.values():
            try:
                _multiprocessing.sem_unlink(sem.name)
            except OSError:
                pass
        self.semaphores.clear()


class SharedLimit:
    """A worker's handle on one shared limit: the semaphore and its own count slot."""

    __slots__ = ("semaphore", "counts", "slot", "maximum", "active")

    def __init__(self, semaphore, counts, slot, maximum):
        self.semaphore = semaphore
        self.counts = counts  # memoryview of 'q' over the worker's count file
        self.slot = slot
        self.maximum = maximum
        self.active = 0  # this worker's part, for its status

    def try_acquire(self) -> bool:
        if not self.semaphore.acquire(False):
            return False
        self.counts[self.slot] += 1
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1
        self.counts[self.slot] -= 1
        self.semaphore.release()

    def set_maximum(self, maximum) -> None:
        """The supervisor has adjusted the semaphore already; this is for the status."""
        self.maximum = maximum


class WorkerLimits:
    """A worker's side: the semaphores named in the supervisor's index, and its count file."""

    def __init__(self, index_path: str, count_file: str):
        self.index_path = index_path
        with open(count_file, "r+b") as stream:
            self._map = mmap.mmap(stream.fileno(), MAX_LIMITS * SLOT)
        self.counts = memoryview(self._map).cast("q")
        # key -> SharedLimit, kept across reloads (their counts go on)
        self.handles: dict[str, SharedLimit] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read the index again (at a reload): open limits that are new."""
        with open(self.index_path) as stream:
            index = json.load(stream)
        for key, entry in index.items():
            handle = self.handles.get(key)
            if handle is None:
                semaphore = _multiprocessing.SemLock._rebuild(
                    0, SEMAPHORE, MAX_VALUE, entry["semaphore"]
                )
                self.handles[key] = SharedLimit(
                    semaphore, self.counts, entry["slot"], entry["maximum"]
                )
            else:
                handle.set_maximum(entry["maximum"])

    def get(self, key: str):
        """The shared limit for `key`, or None when it is unlimited."""
        return self.handles.get(key)
