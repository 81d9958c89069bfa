"""Metrics counted as plain Python numbers on the connection path, handed to prometheus-client
later.

The label children the router uses (`metric.labels(...)`) collect increments, gauge values
and observations locally, and `flush` hands them to prometheus-client, at scrape time (a
collector registered first runs it) and every few seconds. A prometheus-client call per event
costs a lock, and in a worker (its values live in shared files) a `getpid()` system call too,
a dozen times per connection.
"""

import bisect

from prometheus_client import Counter, Gauge, Histogram


class PendingCounter:
    __slots__ = ("child", "amount")

    def __init__(self, child):
        self.child = child
        self.amount = 0

    def inc(self, amount=1):
        self.amount += amount

    def flush(self):
        if self.amount:
            amount, self.amount = self.amount, 0
            self.child.inc(amount)


class PendingGauge:
    __slots__ = ("child", "value", "delta")

    def __init__(self, child):
        self.child = child
        self.value = None  # the last value set, if any since the last flush
        self.delta = 0

    def inc(self, amount=1):
        self.delta += amount

    def dec(self, amount=1):
        self.delta -= amount

    def set(self, value):
        self.value = value
        self.delta = 0

    def flush(self):
        if self.value is not None:
            self.child.set(self.value + self.delta)
        elif self.delta:
            self.child.inc(self.delta)
        self.value = None
        self.delta = 0


class PendingHistogram:
    """Observations counted into the child's buckets here, and handed over as one increment
    per bucket and one of the sum: in a worker each prometheus-client increment writes a
    shared file, and a few seconds of connections handed over one by one (two observations
    each) stalled the worker for tens of milliseconds, the p99 of new connections.

    prometheus-client has no call to observe many values at once, so this reaches into the
    child's bucket bounds and values (`_upper_bounds`, `_buckets`, `_sum`): a prometheus-client
    that renames them fails the metrics tests (tests/test_metrics.py)."""

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child):
        self.child = child
        self.bounds = child._upper_bounds  # ascending, the last +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value):
        self.total += value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value

    def flush(self):
        counts, self.counts = self.counts, [0] * len(self.bounds)
        if not any(counts):
            return
        total, self.total = self.total, 0.0
        self.child._sum.inc(total)
        for bucket, count in zip(self.child._buckets, counts):
            if count:
                bucket.inc(count)


_PENDING = {Counter: PendingCounter, Gauge: PendingGauge, Histogram: PendingHistogram}


class Deferring:
    """A prometheus-client metric whose label children are Pending* (see the module's doc)."""

    def __init__(self, metric, pending):
        self.metric = metric
        self.kind = _PENDING[type(metric)]
        self.children = {}
        self.pending = pending  # every Pending* child of the registry, for flush

    def labels(self, *values):
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.kind(self.metric.labels(*values))
            self.pending.append(child)
        return child


class FlushFirst:
    """Registered before every metric: a scrape flushes the pending updates first."""

    def __init__(self, flush):
        self.flush = flush

    def describe(self):
        return []

    def collect(self):
        self.flush()
        return []
