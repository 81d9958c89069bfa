"""Active health checks (a TCP connect within `timeout` every `interval`, or a probe that
speaks the server's protocol, with rise/fall thresholds) and the passive signal of connect
failures and resets seen by real clients."""

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from l4router.backends.probes import MAX_ANSWER, probe_for
from l4router.backends.server import ProtocolOnce
from l4router.timers import cancel

log = Logger()


class _Connected(Protocol):
    def connectionMade(self):
        self.transport.abortConnection()  # a completed handshake is all a TCP check needs


class _Conversation(Protocol):
    """Sends the probe's greeting, reads until its judge decides; `verdict` fires with
    (passed, why). Ended by the checker's timeout if the server says nothing."""

    def __init__(self, probe):
        self.probe = probe
        self.answer = b""
        self.verdict = defer.Deferred()

    def connectionMade(self):
        if self.probe.greeting:
            self.transport.write(self.probe.greeting)

    def dataReceived(self, data):
        if self.verdict.called:
            return
        self.answer += data
        verdict = self.probe.judge(self.answer[:MAX_ANSWER])
        if verdict is None and len(self.answer) >= MAX_ANSWER:
            verdict = False, f"no verdict in the first {MAX_ANSWER} bytes"
        if verdict is not None:
            self.conclude(*verdict)

    def connectionLost(self, reason):
        self.conclude(False, f"closed after {len(self.answer)} bytes")

    def conclude(self, passed, why):
        if not self.verdict.called:
            self.verdict.callback((passed, why))


class HealthChecker:
    """Counts consecutive results for one server and flips its health at rise/fall."""

    def __init__(self, server, settings, reactor, metrics):
        self.server = server
        self.settings = settings
        self.reactor = reactor
        self.successes = 0
        self.failures = 0
        self.loop = LoopingCall(self.check)
        self.loop.clock = reactor
        self._checking = None
        self.probe = probe_for(settings, server.server.host)
        self._metric_ok = metrics.health_checks.labels(server.backend, server.label, "ok")
        self._metric_failed = metrics.health_checks.labels(server.backend, server.label, "failed")

    def start(self):
        self.loop.start(self.settings.interval, now=True)

    def stop(self):
        if self.loop.running:
            self.loop.stop()
        if self._checking is not None:
            self._checking.cancel()

    def check(self):
        if self._checking is not None:
            return  # the previous check is still waiting for its timeout
        endpoint = self.server.endpoint(self.reactor, self.settings.timeout)
        if endpoint is None:
            self.record(False, "address not resolved")
            return
        if self.probe is None:
            self._checking = endpoint.connect(ProtocolOnce(_Connected()))
            self._checking.addCallback(lambda _: (True, "check passed"))
        else:
            self._checking = self._converse(endpoint)
        self._checking.addErrback(
            lambda failure: (False, f"check failed: {failure.getErrorMessage()}")
        )
        self._checking.addCallback(lambda verdict: self.record(*verdict))
        self._checking.addBoth(self._done)

    def _converse(self, endpoint):
        """Connect, then the probe's exchange, bounded by `timeout` once connected."""
        conversation = _Conversation(self.probe)
        timeout = self.settings.timeout

        def connected(_):
            deadline = self.reactor.callLater(
                timeout,
                conversation.conclude,
                False,
                (f"no answer within {timeout:g}s to the {self.probe.name} probe"),
            )

            def finished(verdict):
                cancel(deadline)
                conversation.transport.abortConnection()
                return verdict

            return conversation.verdict.addBoth(finished)

        return endpoint.connect(ProtocolOnce(conversation)).addCallback(connected)

    def _done(self, _):
        self._checking = None

    def record(self, ok, why, passive=False):
        """A check result, or a passive one (a client's connect failed or was reset)."""
        if not passive:
            (self._metric_ok if ok else self._metric_failed).inc()
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.server.healthy and self.successes >= self.settings.rise:
                self.server.set_healthy(True, f"{self.successes} checks passed")
        else:
            self.failures += 1
            self.successes = 0
            if self.server.healthy and self.failures >= self.settings.fall:
                self.server.set_healthy(False, f"{self.failures} failures in a row, last: {why}")
