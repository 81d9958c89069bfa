"""Delayed calls (the reactor's callLater), handled the one way everywhere, and deadlines of
one length shared by many owners on one timer."""

from collections.abc import Callable, Hashable
from typing import Any

GRANULARITY = 8  # a shared deadline passes between `timeout` and timeout * (1 + 1/GRANULARITY)


def cancel(call: Any) -> None:
    """Cancel a delayed call unless it is None, has run or was cancelled already."""
    if call is not None and call.active():
        call.cancel()


class Deadlines:
    """Deadlines that all have one length (a listener's detection timeout, a backend's connect
    timeout), on one timer instead of a DelayedCall each.

    Most owners remove theirs long before it passes (a client is detected in its first
    segment, a connect to a near server takes a millisecond): adding and removing one is a
    dictionary entry, where a DelayedCall costs an object, a heap push and a cancel. Since
    every deadline has the same length, insertion order is expiry order: the timer looks at
    the oldest ones only. A deadline fires at most timeout/GRANULARITY late.
    """

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.pending: dict[Hashable, tuple[float, Callable[[], object]]] = {}
        self._call: Any = None

    def add(self, owner: Hashable, expired: Callable[[], object]) -> None:
        """Call `expired()` once `timeout` has passed, unless `owner` is removed before."""
        self.pending.pop(owner, None)  # again: to the end, where the latest deadlines are
        self.pending[owner] = (self.clock.seconds() + self.timeout, expired)
        if self._call is None:
            self._call = self.clock.callLater(self.timeout, self._expire)

    def remove(self, owner: Hashable) -> None:
        self.pending.pop(owner, None)

    def _expire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        expired = []
        for owner, (when, callback) in self.pending.items():
            if when > now:
                break
            expired.append((owner, callback))
        for owner, callback in expired:
            if self.pending.pop(owner, None) is not None:  # an earlier callback may remove it
                callback()
        if self.pending and self._call is None:  # (a callback may have added one)
            when = next(iter(self.pending.values()))[0]
            delay = max(when - now, self.timeout / GRANULARITY)
            self._call = self.clock.callLater(delay, self._expire)

    def stop(self) -> None:
        """Forget every deadline (the owners are being ended anyway)."""
        self.pending.clear()
        cancel(self._call)
        self._call = None
