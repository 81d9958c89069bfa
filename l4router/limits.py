"""Connection admission: process-wide, per listener and per source address."""

import collections

from l4router.addresses import source_key

LIMIT_PROCESS = "limit_process"
LIMIT_LISTENER = "limit_listener"
LIMIT_SOURCE = "limit_source"


def worker_share(limit, workers):
    """One worker's part of a limit: the kernel spreads connections evenly over the workers,
    so each holds 1/N of it, rounded up (a limit is never cut to nothing)."""
    return None if limit is None else -(-limit // workers)


class ProcessLimit:
    """The process-wide count, shared by every listener."""

    def __init__(self, maximum=None):
        self.maximum = maximum
        self.active = 0


class Admission:
    """Counts a listener's active connections; `admit` answers None or the rejection reason.
    In a worker, the limits are its share (`workers`: how many share them)."""

    def __init__(self, process, maximum=None, per_source=None, workers=1, ipv6_prefix=64):
        self.process = process
        self.workers = workers
        self.configure(maximum, per_source, ipv6_prefix)
        self.active = 0
        self.by_source = collections.Counter()

    def configure(self, maximum, per_source, ipv6_prefix=64):
        self.maximum = worker_share(maximum, self.workers)
        self.per_source = worker_share(per_source, self.workers)
        self.ipv6_prefix = ipv6_prefix

    def admit(self, source):
        """Admit a connection from `source` (None: its real source is not known yet)."""
        if self.process.maximum is not None and self.process.active >= self.process.maximum:
            return LIMIT_PROCESS
        if self.maximum is not None and self.active >= self.maximum:
            return LIMIT_LISTENER
        if source is not None:
            refusal = self.admit_source(source)
            if refusal is not None:
                return refusal
        self.process.active += 1
        self.active += 1
        return None

    def admit_source(self, source):
        """Count a connection against its source; a PROXY header reveals it after accept."""
        key = source_key(source, self.ipv6_prefix)
        if self.per_source is not None and self.by_source[key] >= self.per_source:
            return LIMIT_SOURCE
        self.by_source[key] += 1
        return None

    def release(self, source):
        """Release an admitted connection; `source` as counted, or None if it never was."""
        self.process.active -= 1
        self.active -= 1
        if source is not None:
            self.release_source(source)

    def release_source(self, source):
        key = source_key(source, self.ipv6_prefix)
        remaining = self.by_source[key] - 1
        if remaining:
            self.by_source[key] = remaining
        else:
            del self.by_source[key]
