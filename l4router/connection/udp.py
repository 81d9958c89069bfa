"""UDP listeners: per-client sessions, detection on the first datagrams, a connected socket
per session towards its server, idle expiry.

A session is keyed by the client's address and port. Its first datagrams are held (bounded in
count and bytes) until the detectors decide; then the session's own connected UDP socket
carries them to the chosen server, and replies go back to that client. Datagram boundaries
are kept exactly.
"""

import errno
import itertools
import socket

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from l4router.connection.addresses import normalise_host
from l4router.connection.listener import ListenerRuntime
from l4router.connection.quic_paths import ConnectionIds, QuicLbServers
from l4router.connection.reasons import Reason
from l4router.detection.decision import Decision
from l4router.detection.session import DECIDED, DetectionSession
from l4router.errors import BackendUnavailable, BindFailed
from l4router.process.service import ListenerService
from l4router.process.sockets import MAX_DATAGRAM, parse_udp_listen

log = Logger()

READS_PER_WAKEUP = 16  # datagrams read from a session's socket before others get a turn

# Session end reasons (l4router_udp_sessions_ended_total) and drop reasons.

QUIC_LB_ROUTE = "quic_lb"  # the route of a session that QUIC-LB sent to its server

_session_ids = itertools.count(1)


class UDPListener(ListenerRuntime, DatagramProtocol):
    """One UDP listener: the sessions of its clients."""

    def __init__(self, *args, **kwargs):
        self.sessions = {}
        self.quic_ids = ConnectionIds()  # QUIC sessions by their server's connection IDs
        super().__init__(*args, **kwargs)

    @property
    def connections(self):
        return list(self.sessions.values())

    def reconfigure(self, listener, detectors, backends, *args, **kwargs):
        super().reconfigure(listener, detectors, backends, *args, **kwargs)
        self.quic_lb = QuicLbServers(backends)

    def bytes_relayed(self):
        return self.bytes_closed + sum(s.bytes_up + s.bytes_down for s in self.sessions.values())

    def datagramReceived(self, data, addr):
        session = self.sessions.get(addr)
        if session is None:
            session = self.quic_ids.find(data)
            if session is not None:  # a QUIC client whose address changed: its session
                self._move(session, addr)
                session.from_client(data)
                return
            named = self.quic_lb.find(data)  # an ID its server issued, unseen: QUIC-LB
            refusal = self.admission.admit(normalise_host(addr[0]))
            if refusal is not None:
                self.refused_total += 1
                self.metrics.udp_dropped(refusal).inc()
                self.refusals.event(refusal, self.log_refusals)
                return
            self.accepted_total += 1
            session = self.sessions[addr] = UDPSession(self, addr)
            self.metrics.udp_sessions_active.inc()
            if named is not None:
                session.resume_at(*named)
        session.from_client(data)

    def _move(self, session, addr):
        """Replies go to the new address from now on. Limits go on counting the session
        under the source it started from."""
        del self.sessions[session.client]
        session.client = addr
        self.sessions[addr] = session
        self.metrics.udp_migrated.inc()

    def reply(self, data, addr):
        self.transport.write(data, addr)

    def session_ended(self, session):
        self.quic_ids.forget(session)
        del self.sessions[session.client]
        self.admission.release(session.source)
        self.metrics.udp_sessions_active.dec()

    def close_all(self, reason):
        for session in list(self.sessions.values()):
            session.close(reason)


@implementer(IReadDescriptor)
class BackendSocket:
    """The session's connected, non-blocking socket towards its server, read by the reactor.

    A plain socket rather than a Twisted UDP port: a port logs its start and end (two lines
    per session) and asks the kernel for its name; a session needs neither.
    """

    __slots__ = ("session", "socket", "reactor", "fileno")

    def __init__(self, reactor, session, host, port):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)  # OSError: the caller's
        try:
            self.socket.setblocking(False)
            self.socket.connect((host, port))
        except OSError:
            self.socket.close()
            raise
        self.session = session
        self.reactor = reactor
        self.fileno = self.socket.fileno
        reactor.addReader(self)

    def logPrefix(self):
        return "l4router-udp-session"

    def write(self, data):
        try:
            self.socket.send(data)
        except BlockingIOError:
            pass  # a full send buffer drops the datagram, as the network may
        except OSError as exc:
            self._failed(exc)

    def doRead(self):
        for _ in range(READS_PER_WAKEUP):
            try:
                data = self.socket.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return None
            except OSError as exc:
                self._failed(exc)
                return None
            self.session.from_backend(data)
            if self.session.closed:
                return None
        return None

    def _failed(self, exc):
        """ICMP port or host unreachable comes back as an error on the connected socket."""
        if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            log.warn("UDP session {id}: {error}", id=self.session.id, error=str(exc))
        self.session.close(Reason.BACKEND_UNREACHABLE)

    def connectionLost(self, reason):
        """The reactor dropped the descriptor: an ICMP error on the connected socket shows as
        EPOLLERR without anything to read."""
        if not self.session.closed:
            self.session.close(Reason.BACKEND_UNREACHABLE)

    def close(self):
        self.reactor.removeReader(self)
        self.socket.close()


class UDPSession:
    def __init__(self, listener, client):
        self.listener = listener
        self.client = client  # the address replies go to, as the socket spells it
        self.source = normalise_host(client[0])  # as routes, limits and logs see it
        self.id = next(_session_ids)
        clock = listener.clock
        self.started = clock.seconds()
        self.session = DetectionSession(
            listener.detectors, listener.listener.detect.max_bytes, datagrams=True
        )
        self.decision = None
        self.route = None
        self.backend_name = None
        self.server = None
        self.port = None
        self.bytes_up = self.bytes_down = 0
        self.datagrams_up = self.datagrams_down = 0
        self.closed = False
        self.follows_quic_ids = False  # a QUIC session: its server's IDs are learned
        self.quic_ids = []
        self.idle = listener.idle_sweeper
        self.deadlines = listener.detect_deadlines  # the detection timeout's
        self.deadlines.add(self, self._detect_timed_out)

    # Client side

    def from_client(self, data):
        self.bytes_up += len(data)
        self.datagrams_up += 1
        if self.port is not None:
            self.listener.metrics.udp_datagrams_up.inc()
            self.port.write(data)
            return
        if self.decision is not None:
            return  # decided, not relaying: rejected, being closed
        step = self.session.feed_datagram(data)
        if step.kind == DECIDED:
            self._decided(step.decision)

    def _detect_timed_out(self):
        step = self.session.timed_out()
        if step.kind == DECIDED:
            self._decided(step.decision)

    def _decided(self, decision):
        listener = self.listener
        self.deadlines.remove(self)
        self.decision = decision
        self.follows_quic_ids = decision.protocol == "quic"
        choice = listener.routes.choose(decision, self.source)
        self.route = choice.route
        listener.metrics.udp_created(decision.protocol).inc()
        listener.metrics.routed(decision.protocol, choice.route, choice.backend or "reject").inc()
        if choice.backend is None:
            self.close(Reason.REJECTED)
            return
        self.backend_name = choice.backend
        group = listener.backends[choice.backend]
        try:
            try:
                self.server = group.pick(self.source)
            except BackendUnavailable as error:
                if error.reason != Reason.NO_HEALTHY_SERVER or choice.fallback is None:
                    raise
                # The route's backend has no server up: its fallback serves instead.
                self.backend_name = choice.fallback
                group = listener.backends[choice.fallback]
                listener.metrics.fallback(choice.route, choice.fallback).inc()
                self.server = group.pick(self.source)
        except BackendUnavailable as error:
            log.warn(
                "UDP session {id} from {source} gets no server of backend {backend}: {error}",
                id=self.id,
                source=self.source,
                backend=group.name,
                error=str(error),
                reason=error.reason,
            )
            self.close(error.reason)
            return
        self._open_backend_socket()

    def resume_at(self, group, server):
        """A QUIC connection that moved to an ID the router never saw, which names its server
        (QUIC-LB): straight to that server, without detection (a short header has nothing to
        detect)."""
        self.deadlines.remove(self)
        self.decision = Decision("quic", {"quic_lb": True})
        self.follows_quic_ids = True
        self.route = QUIC_LB_ROUTE
        self.backend_name = group.name
        self.listener.metrics.udp_created("quic").inc()
        server.acquire()
        self.server = server
        self._open_backend_socket()

    def _open_backend_socket(self):
        try:
            self.port = BackendSocket(
                self.listener.clock, self, self.server.address, self.server.server.port
            )
        except OSError as exc:  # out of descriptors, say: end now, releasing everything
            self.listener.refusals.event(Reason.SOCKET_UNAVAILABLE, self.listener.log_refusals)
            log.debug("UDP session {id}: no socket: {error}", id=self.id, error=str(exc))
            self.close(Reason.SOCKET_UNAVAILABLE)
            return
        metrics = self.listener.metrics
        for datagram in self.session.take_held():
            metrics.udp_datagrams_up.inc()
            self.port.write(datagram)
        self.idle.watch(self)

    # Backend side

    def from_backend(self, data):
        if self.follows_quic_ids and data[0] & 0x80:  # a long header: the server's ID
            self.listener.quic_ids.learn(self, data)
        self.bytes_down += len(data)
        self.datagrams_down += 1
        self.listener.metrics.udp_datagrams_down.inc()
        self.listener.reply(data, self.client)

    # Ending

    def activity(self):
        return self.datagrams_up, self.datagrams_down

    def idled(self):
        self.close(Reason.IDLE_TIMEOUT)

    def abort(self, reason):
        """Ended at once from outside (an operator disabled its server): as a TCP relay's."""
        self.close(reason)

    def close(self, reason):
        if self.closed:
            return
        self.closed = True
        self.deadlines.remove(self)
        self.idle.unwatch(self)
        if self.port is not None:
            self.port.close()
        if self.server is not None:
            self.server.release()
        listener = self.listener
        listener.session_ended(self)
        record = self.describe(listener.clock.seconds())
        record["reason"] = reason
        listener.record_end(record)

    def describe(self, now):
        decision = self.decision
        return {
            "connection_id": self.id,
            "listener": self.listener.name,
            "transport": "udp",
            "source": self.source,
            "source_port": self.client[1],
            "protocol": decision.protocol if decision else None,
            "fields": dict(decision.fields) if decision else {},
            "route": self.route,
            "backend": self.backend_name,
            "server": self.server.label if self.server is not None else None,
            "datagrams_up": self.datagrams_up,
            "datagrams_down": self.datagrams_down,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration": now - self.started,
        }


class UDPListenerService(ListenerService):
    """A UDP listener's sockets; stopping ends its sessions at once (a datagram flow has no
    end to wait for)."""

    def bind(self, description):
        host, port = parse_udp_listen(description)
        try:
            return self.reactor.listenUDP(
                port, self.factory, interface=host, maxPacketSize=MAX_DATAGRAM
            )
        except Exception as exc:
            raise BindFailed(f"cannot listen on udp {host}:{port}: {exc}") from None

    def addresses(self):
        return [f"udp {p.getHost().host}:{p.getHost().port}" for p in self.ports]

    def startService(self):
        listener = self.listener
        for key, value in (
            ("max_sessions", listener.max_connections),
            ("max_sessions_per_source", listener.max_connections_per_source),
        ):
            if value is None:
                log.warn(
                    "Listener {listener}: {key} is unlimited: spoofed UDP sources can "
                    "fill the session table and use up descriptors",
                    listener=listener.name,
                    key=key,
                )
        super().startService()

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)  # not ListenerService's drain: sessions end here
        self.factory.close_all(Reason.SHUTDOWN)
        yield self.stop_listening()
