"""Connection admission: process-wide, per listener and per source address.

A limit means the same with one process or several workers:
- the process-wide and per-listener counts are `Limit`s: a plain count in one process, a
  semaphore shared by every worker under a supervisor (l4router.process.shared_limits);
- per-source counts stay in the worker: the supervisor steers every connection of one source
  to one worker (l4router.process.steering), so that worker's count is the whole count.
"""

from __future__ import annotations

import collections
import time

from l4router.connection.addresses import source_key
from l4router.connection.reasons import Reason

MAX_IDLE_BUCKETS = 10000  # past this, full buckets (equal to none) are dropped


class TokenBuckets:
    """New connections a source may open: `rate` a second on average, `burst` at once. A
    bucket refills with time; a full one is the same as none, so the table keeps only
    sources that opened connections lately."""

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets = {}  # key -> (tokens, when they were counted)

    def take(self, key):
        now = self.clock()
        tokens, then = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets[key] = (tokens - 1, now)
        if len(self.buckets) > MAX_IDLE_BUCKETS:
            self._drop_full(now)
        return True

    def _drop_full(self, now):
        for key, (tokens, then) in list(self.buckets.items()):
            if tokens + (now - then) * self.rate >= self.burst:
                del self.buckets[key]


class LocalLimit:
    """A count of admitted connections against a maximum (None: unlimited), in this process."""

    def __init__(self, maximum: int | None = None):
        self.maximum = maximum
        self.active = 0

    def try_acquire(self) -> bool:
        if self.maximum is not None and self.active >= self.maximum:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1

    def set_maximum(self, maximum: int | None) -> None:
        self.maximum = maximum


class Unlimited(LocalLimit):
    """A worker's count of a limit its supervisor does not share (unlimited when the workers
    started): it stays unlimited whatever a reload says, until a restart."""

    def set_maximum(self, maximum: int | None) -> None:
        pass


class NameLimit:
    """Concurrent connections per detected name (SNI, Host, :authority) of one listener.

    Names are not steered to one worker (they are known only after the accept), so with N
    workers each admits `maximum // N` of a name (at least 1): together never more than the
    maximum (unless it is below N), possibly fewer while one worker has more of them."""

    def __init__(self, maximum: int | None, workers: int = 1):
        self.counts: collections.Counter[str] = collections.Counter()
        self.workers = workers
        self.set_maximum(maximum)

    def set_maximum(self, maximum: int | None) -> None:
        self.maximum = None if maximum is None else max(1, maximum // self.workers)

    def try_acquire(self, name: str) -> bool:
        if self.maximum is not None and self.counts[name] >= self.maximum:
            return False
        self.counts[name] += 1
        return True

    def release(self, name: str) -> None:
        remaining = self.counts[name] - 1
        if remaining > 0:
            self.counts[name] = remaining
        else:
            del self.counts[name]


class ChoiceLimits:
    """The limits a connection meets once its route is chosen: the route's (`routes`: route
    label -> limit, shared with the other workers like the listener's) and its detected
    name's (`names`). A backend's own limit is its group's (`limit`)."""

    def __init__(self, routes=None, names: NameLimit | None = None):
        self.routes = routes or {}
        self.names = names


class Admission:
    """Admits a listener's connections; `admit` answers None or the rejection reason."""

    def __init__(
        self,
        process,
        maximum=None,
        per_source=None,
        ipv6_prefix=64,
        listener=None,
        rate=None,
        clock=time.monotonic,
    ):
        """`process`: the process-wide Limit; `listener`: this listener's Limit (a shared one
        under a supervisor), by default a local one of `maximum`; `rate`: a RateLimit of new
        connections per source (exact with workers too: a source is steered to one)."""
        self.process = process
        self.listener = listener if listener is not None else LocalLimit(maximum)
        self.by_source = collections.Counter()
        self.clock = clock
        self.rate = None
        self.configure(maximum, per_source, ipv6_prefix, rate)

    @property
    def active(self) -> int:
        return self.listener.active

    @property
    def maximum(self) -> int | None:
        return self.listener.maximum

    def configure(self, maximum, per_source, ipv6_prefix=64, rate=None):
        self.listener.set_maximum(maximum)
        self.per_source = per_source
        self.ipv6_prefix = ipv6_prefix
        if rate is None:
            self.rate = None
        elif self.rate is None or (self.rate.rate, self.rate.burst) != (rate.rate, rate.burst):
            self.rate = TokenBuckets(rate.rate, rate.burst, self.clock)

    def admit(self, source):
        """Admit a connection from `source` (None: its real source is not known yet)."""
        if not self.process.try_acquire():
            return Reason.LIMIT_PROCESS
        if not self.listener.try_acquire():
            self.process.release()
            return Reason.LIMIT_LISTENER
        if source is not None:
            refusal = self.admit_source(source)
            if refusal is not None:
                self.listener.release()
                self.process.release()
                return refusal
        return None

    def admit_source(self, source):
        """Count a connection against its source; a PROXY header reveals it after accept."""
        key = source_key(source, self.ipv6_prefix)
        if self.per_source is not None and self.by_source[key] >= self.per_source:
            return Reason.LIMIT_SOURCE
        if self.rate is not None and not self.rate.take(key):
            return Reason.RATE_SOURCE
        self.by_source[key] += 1
        return None

    def release(self, source):
        """Release an admitted connection; `source` as counted, or None if it never was."""
        self.listener.release()
        self.process.release()
        if source is not None:
            self.release_source(source)

    def release_source(self, source):
        key = source_key(source, self.ipv6_prefix)
        remaining = self.by_source[key] - 1
        if remaining:
            self.by_source[key] = remaining
        else:
            del self.by_source[key]
