"""The reactor of ours, turned by hand in a test: on real loopback sockets, with nothing
left registered or open once the test ends."""

from contextlib import contextmanager

from l4router.process.reactor import LeanEPollReactor


class CountingPoller:
    """The reactor's epoll object, counting the registration calls made through it."""

    def __init__(self, poller):
        self.poller = poller
        self.calls = []

    def register(self, fd, events):
        self.calls.append(("add", fd, events))
        return self.poller.register(fd, events)

    def modify(self, fd, events):
        self.calls.append(("mod", fd, events))
        return self.poller.modify(fd, events)

    def unregister(self, fd):
        self.calls.append(("del", fd))
        return self.poller.unregister(fd)

    def poll(self, *args):
        return self.poller.poll(*args)

    def close(self):
        self.poller.close()

    def fileno(self):
        return self.poller.fileno()


@contextmanager
def hand_turned(poller=None, kind=LeanEPollReactor):
    """A reactor (`kind`: ours, or one of Twisted's) not installed as the global one;
    `poller`, a wrapper class of its epoll object (CountingPoller)."""
    reactor = kind()
    if poller is not None:
        reactor._poller = poller(reactor._poller)
    try:
        yield reactor
    finally:
        reactor.removeAll()
        reactor._poller.close()


def turn_until(reactor, predicate, turns=500):
    for _ in range(turns):
        if predicate():
            return
        reactor.runUntilCurrent()
        reactor.doIteration(0.01)
    raise AssertionError("the condition did not come true")
