"""Balancing policies: in which order a backend's servers are tried for one client."""


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: weights 1:1:2 give a, c, b, c — never bursts.

    `order()` gives the chosen server first and then the others as failover candidates.
    """

    def __init__(self, servers):
        self.servers = tuple(servers)
        self.total = sum(s.weight for s in self.servers)
        self.current = [0] * len(self.servers)

    def order(self):
        best = 0
        for index, server in enumerate(self.servers):
            self.current[index] += server.weight
            if self.current[index] > self.current[best]:
                best = index
        self.current[best] -= self.total
        return self.servers[best:] + self.servers[:best]
