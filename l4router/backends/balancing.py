"""Balancing policies: which eligible server of a backend gets the next client.

Each policy chooses among the candidates it is given (healthy, not full, not yet tried for this
client), so failover is simply asking again without the server that failed.
"""

import hashlib
import math
import random


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: weights 1:1:2 give a, c, b, c; never bursts."""

    def choose(self, candidates, source):
        total = 0
        best = None
        for server in candidates:
            server.current_weight += server.weight
            total += server.weight
            if best is None or server.current_weight > best.current_weight:
                best = server
        best.current_weight -= total
        return best


class WeightedRandom:
    def __init__(self, generator=None):
        self.random = generator or random.Random()

    def choose(self, candidates, source):
        return self.random.choices(candidates, weights=[s.weight for s in candidates])[0]


class LeastConnections:
    """Fewest active connections per unit of weight; ties go round the servers in turn."""

    def __init__(self):
        self.turn = 0

    def choose(self, candidates, source):
        self.turn += 1
        count = len(candidates)
        return min(
            (candidates[(self.turn + i) % count] for i in range(count)),
            key=lambda s: s.active / s.weight,
        )


class SourceHash:
    """Weighted rendezvous hashing of the client address: a source stays on its server, and
    removing a server moves only the sources that were on it (adding one takes about 1/N)."""

    def choose(self, candidates, source):
        return max(candidates, key=lambda server: _score(source, server))


def _score(source, server):
    digest = hashlib.blake2b(f"{source}|{server.label}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -server.weight / math.log(unit)


POLICIES = {
    "round_robin": SmoothWeightedRoundRobin,
    "random": WeightedRandom,
    "least_connections": LeastConnections,
    "source_hash": SourceHash,
}
