"""One TCP client: peek and detect, route, connect, hand over to the relay, record."""

import itertools
import secrets

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from l4router.backends.named import CLIENT_NAMED_REFUSALS
from l4router.connection.addresses import normalise_host
from l4router.connection.proxy_out import proxy_header
from l4router.connection.reasons import Reason
from l4router.connection.relay import Relay
from l4router.detection.session import (
    DECIDED,
    ELICIT,
    HEADER,
    HEADER_EXPECTED,
    HEADER_NONE,
    HEADER_REFUSED,
    PAUSE,
    WAIT,
    DetectionSession,
)
from l4router.errors import BackendUnavailable

log = Logger()

_connection_ids = itertools.count(1)
_PROCESS_ID = secrets.token_hex(4)  # makes connection ids unique beyond this process
# A client that waits for the server (grpcio) is drawn out once it has been quiet this long;
# one that goes on sending (curl's HEADERS right after its preface) is never disturbed.
ELICIT_AFTER_QUIET = 0.02


@implementer(IHalfCloseableProtocol)
class InboundConnection(Protocol):
    """One client: its detection session (l4router.detection.session) until a decision, then
    the route, the connect, the relay (of which it is the client half: it forwards what it
    reads to the backend transport and counts it) and the record."""

    # What is not known yet, or rarely needed, are class defaults, set on a connection when it
    # is: CPython keeps an object's attributes compactly only up to 30 names; past that, every
    # connection would carry a dict of its own (about 1 KiB more per connection).
    _elicit_call = None  # the elicitation waiting for the client to go quiet
    received = 0
    read_closed = False
    decision = None
    route = None
    backend_name = None
    group = None
    _fallback = None  # the route's fallback backend, until it has been used
    server = None
    relay = None
    backend = None
    close_reason = None
    _detect_deadline = None  # the Deadlines its detection timeout is registered with
    _connecting = None
    _held = ()  # how to give back the route's and the name's permits
    _backend_permit = None  # the backend's limit, while it holds one of it
    _ended = False

    def __init__(self, factory, source, source_port, header_expected=False):
        self.factory = factory
        self.id = next(_connection_ids)
        self.source = source
        self.source_port = source_port
        self.source_counted = not header_expected  # a trusted balancer is not a source
        listener = factory.listener
        if header_expected:
            header = HEADER_EXPECTED
        else:  # behind balancers, a header from anyone else is a forged address
            header = HEADER_REFUSED if listener.accept_proxy_protocol else HEADER_NONE
        self.session = DetectionSession(factory.detectors, listener.detect.max_bytes, header)
        self.started = factory.clock.seconds()

    def connectionMade(self):
        # TCP_NODELAY comes from the listening socket (service.no_delay_for_accepted).
        self._detect_deadline = deadlines = self.factory.detect_deadlines
        deadlines.add(self, self._detect_timed_out)

    def dataReceived(self, data):
        if self.relay is not None:
            self.relay.forward(self, data)
            return
        step = self.session.feed(data)
        self.received = len(self.session.buffer)  # what the backend gets (no PROXY header)
        self._step(step)

    def readConnectionLost(self):
        self.read_closed = True
        if self.relay is not None:
            self.relay.side_finished_sending(self)
        else:
            self._step(self.session.end_of_stream())

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        if self.relay is not None:
            self.relay.side_lost(self, reason)
            return
        self._cancel_detect_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        clean = reason is None or isinstance(reason.value, ConnectionDone)
        self._end(
            self.close_reason or (Reason.CLIENT_CLOSED_EARLY if clean else Reason.CLIENT_RESET)
        )

    # Detection: what the session says to do

    def _step(self, step):
        kind = step.kind
        if kind == WAIT:
            self._cancel_elicit()  # the client is not quiet: no elicitation yet
        elif kind == DECIDED:
            self._decided(step.decision)
        elif kind == PAUSE:
            self.transport.pauseProducing()  # connecting: hold what came, read no more
        elif kind == ELICIT:
            self._cancel_elicit()
            self._elicit_call = self.factory.clock.callLater(
                ELICIT_AFTER_QUIET, self._elicit, step.offer
            )
        elif kind == HEADER:
            self._take_source(step.header)
        else:
            if step.reason == Reason.PROXY_UNTRUSTED:
                # Someone claims an address not theirs: logged.
                self.factory.refusals.event(Reason.PROXY_UNTRUSTED, self.factory.log_refusals)
            self._reject(step.reason)

    def _take_source(self, header):
        """A trusted balancer's PROXY header names the client: admitted by its address."""
        if header.source is not None:
            self.source, self.source_port = normalise_host(header.source), header.source_port
        refusal = self.factory.admission.admit_source(self.source)
        if refusal is not None:
            self._reject(refusal)
            return
        self.source_counted = True
        self._step(self.session.resume())

    def _elicit(self, offer):
        self._elicit_call = None
        self.transport.write(self.session.elicit(offer))

    def _cancel_elicit(self):
        if self._elicit_call is not None:
            self._elicit_call.cancel()
            self._elicit_call = None

    def _detect_timed_out(self):
        self._detect_deadline = None
        self._step(self.session.timed_out())

    def _cancel_detect_timer(self):
        self._cancel_elicit()
        if self._detect_deadline is not None:
            self._detect_deadline.remove(self)
            self._detect_deadline = None

    def _decided(self, decision):
        self._cancel_detect_timer()
        self.decision = decision
        metrics = self.factory.metrics
        metrics.detection_seconds.observe(self.factory.clock.seconds() - self.started)
        if decision.fields.get("truncated"):
            metrics.truncated(decision.protocol).inc()
        choice = self.factory.routes.choose(decision, self.source)
        self.route = choice.route
        metrics.routed(decision.protocol, choice.route, choice.backend or "reject").inc()
        if choice.backend is None:
            self._reject(Reason.REJECTED)
            return
        refusal = self._hold_choice_limits(choice.route, decision.fields)
        if refusal is not None:
            self._refuse(refusal)
            return
        self.backend_name = choice.backend
        self._fallback = choice.fallback
        self._connect(self.factory.backends[choice.backend])

    # Connecting

    def _hold_choice_limits(self, route, fields):
        """Take the route's and the detected name's permits; the reason of a refusal."""
        limits = self.factory.choice_limits
        limit = limits.routes.get(route)
        if limit is not None:
            if not limit.try_acquire():
                return Reason.LIMIT_ROUTE
            self._held = (*self._held, limit.release)
        names = limits.names
        name = names is not None and (
            fields.get("sni") or fields.get("host") or fields.get("authority")
        )
        if name:
            if not names.try_acquire(name):
                return Reason.LIMIT_NAME
            self._held = (*self._held, lambda: names.release(name))
        return None

    def _connect(self, group):
        # The client is read on while the backend connects (bytes wait in the buffer, up to
        # max_bytes): pausing and resuming it would cost two epoll_ctl per connection.
        if self._backend_permit is not None:  # a fallback: the first backend's goes back
            self._backend_permit.release()
            self._backend_permit = None
        if group.limit is not None:
            if not group.limit.try_acquire():
                self._refuse(Reason.LIMIT_BACKEND)
                return
            self._backend_permit = group.limit
        self.group = group
        fields = self.decision.fields
        server_from = group.config.server_from
        if server_from is not None and server_from.captures:  # the route's named groups too
            fields = {**fields, **self.factory.routes.captures(self.route, self.decision)}
        connecting = group.connect_to(self.source, fields, self._connected, self._connect_failed)
        if not connecting.called:  # a spare, or no server up: it may have reported already
            self._connecting = connecting

    def _connected(self, connection):
        self._connecting = None
        self.server, self.backend = connection
        replay, rewriter = self.session.replay()
        self.session = None  # its part is done
        replay = self._proxy_header() + replay
        relay = Relay(
            self,
            self.backend,
            self.factory.idle_sweeper,
            self._end,
            splice=self.factory.listener.relay == "splice",
            rewrite_client=rewriter,
        )
        relay.start(replay, client_finished_sending=self.read_closed)

    def _proxy_header(self):
        """PROXY protocol out: the client's real addresses, before anything else."""
        config = self.group.config
        if config.proxy_protocol == "none":
            return b""
        fields = self.decision.fields if self.decision is not None else {}
        return proxy_header(
            config.proxy_protocol,
            config.proxy_tlvs,
            self.source,
            self.source_port,
            self.transport.getHost(),
            fields,
            self.unique_id,
        )

    @property
    def unique_id(self):
        """This connection's id, unique across processes and restarts (access log, PROXY)."""
        return f"{_PROCESS_ID}-{self.id}"

    def _connect_failed(self, failure):
        self._connecting = None
        if failure.check(defer.CancelledError):
            return None  # the client left while we were connecting
        reason = Reason.CONNECT_FAILED
        if failure.check(BackendUnavailable):
            reason = failure.value.reason
            if reason == Reason.NO_HEALTHY_SERVER and self._fallback is not None:
                # The route's backend has no server up: its fallback serves instead.
                self.backend_name, self._fallback = self._fallback, None
                self.factory.metrics.fallback(self.route, self.backend_name).inc()
                self._connect(self.factory.backends[self.backend_name])
                return None
            if reason in CLIENT_NAMED_REFUSALS:
                # What a client chose: logged at a bounded rate, like the limits' refusals.
                self.factory.refusals.event(reason, self.factory.log_refusals)
            else:
                log.warn(
                    "Connection {id} from {source} gets no server of backend {backend}: {error}",
                    backend=self.group.name,
                    id=self.id,
                    source=self.source,
                    error=failure.getErrorMessage(),
                    reason=reason,
                )
        else:
            log.failure(
                "Connecting connection {id} to backend {backend} failed",
                failure,
                id=self.id,
                backend=self.group.name,
            )
        self._reject(reason)
        return None

    # Ending

    def _reject(self, reason):
        self._cancel_detect_timer()
        self.factory.metrics.rejected(reason).inc()
        self._close(reason)

    def _refuse(self, reason):
        """A limit refused it: counted, and logged at a bounded rate."""
        self.factory.refusals.event(reason, self.factory.log_refusals)
        self._reject(reason)

    def _close(self, reason):
        self.close_reason = reason
        self.transport.loseConnection()

    def abort(self, reason):
        """Used by shutdown: end the connection now, whatever state it is in."""
        if self.relay is not None:
            self.relay.close(reason, abort=True)
        else:
            self.close_reason = reason
            self.transport.abortConnection()

    def _end(self, reason):
        if self._ended:
            return
        self._ended = True
        factory = self.factory
        factory.connection_ended(self)
        for release in self._held:
            release()
        if self._backend_permit is not None:
            self._backend_permit.release()
        if self.server is not None:
            self.server.release()
            if reason == Reason.BACKEND_RESET:
                self.group.passive_result(self.server, False, "reset by the server")
        record = self.describe(factory.clock.seconds())
        record["reason"] = reason
        factory.record_end(record)
        # The relay points back at this connection: without that cycle, ending frees it
        # at once, instead of leaving it to the collector (whose pauses show in the p99).
        self.relay = None

    def describe(self, now):
        """What is known of this connection: the access-log fields and the status view."""
        decision = self.decision
        return {
            "connection_id": self.id,
            "unique_id": self.unique_id,
            "listener": self.factory.name,
            "transport": "tcp",
            "source": self.source,
            "source_port": self.source_port,
            "protocol": decision.protocol if decision else None,
            "fields": dict(decision.fields) if decision else {},
            "route": self.route,
            "backend": self.backend_name,
            "server": self.server.label if self.server is not None else None,
            "bytes_up": self.received if self.relay is not None else 0,
            "bytes_down": self.backend.received if self.relay is not None else 0,
            "duration": now - self.started,
        }
