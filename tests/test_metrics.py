"""Metrics counted as plain numbers and handed to prometheus-client later: what a scrape shows
is what prometheus-client would have shown had it been called at every event."""

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from l4router.operate.pending_metrics import Deferring

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def samples(registry, name):
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith(name) and not s.name.endswith("_created")
    }


@pytest.mark.parametrize("seed", range(3))
def test_a_pending_histogram_flushed_equals_one_observed_value_by_value(seed):
    rng = random.Random(seed)
    # Values on the bounds too: a bucket counts what is <= its bound.
    values = [
        rng.choice([*BUCKETS, 0.0, 5.0, rng.random() / rng.choice([1, 10, 100])])
        for _ in range(500)
    ]
    direct, deferred = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "h", ["listener"], buckets=BUCKETS, registry=direct)
    pending = []
    counted = Deferring(
        Histogram("h", "h", ["listener"], buckets=BUCKETS, registry=deferred), pending
    )
    for index, value in enumerate(values):
        reference.labels("edge").observe(value)
        counted.labels("edge").observe(value)
        if index in (100, 101, 400):  # flushed now and then, as the router does
            for child in pending:
                child.flush()
    for child in pending:
        child.flush()
    expected, got = samples(direct, "h"), samples(deferred, "h")
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(expected[k]) for k in expected), (got, expected)
    assert got[("h_count", (("listener", "edge"),))] == len(values)
