"""The detect phase of one client, without I/O: the same for a TCP connection and a UDP session.

It is fed what the client sends (bytes, or datagrams), the end of its stream and the detection
timeout, and answers with a Step: wait for more, draw the client out (elicitation), decided,
or refused. It owns what the phase needs: the PROXY header (taken from trusted senders,
refused from anyone else), `detect.max_bytes`, the held datagrams, what was elicited and the
rewriting of the replay. The caller owns the sockets and the timers, so this is tested like the
parsers: bytes in, steps out, at every split point.

The work for a flight is linear in its bytes whatever its segmentation: the bytes gather in a
bytearray, detectors that said NO_MATCH are not asked again, and the one that needs more is
asked again only once the flight has reached the length it named (`bytes_needed`: the end of
a TLS record or an HTTP/2 frame, say).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from l4router.connection.reasons import Reason
from l4router.detection.decision import TIMEOUT, Decision, DetectorSet, Progress, safe_value
from l4router.detection.peek import Peek
from l4router.parsers import INCOMPLETE, proxyprotocol
from l4router.parsers.proxyprotocol import ProxyHeader

log = Logger()

MAX_HELD_DATAGRAMS = 16  # a UDP client's first datagrams held until the decision

# What a Step says (Step.kind).
WAIT = "wait"  # more bytes or datagrams are needed (or held while the backend connects)
PAUSE = "pause"  # decided, and more than max_bytes are held: stop reading until connected
ELICIT = "elicit"  # once the client has gone quiet, send it `offer` (see DetectionSession.elicit)
HEADER = "header"  # a PROXY header gave the client's address: admit it, then resume()
DECIDED = "decided"
REFUSED = "refused"


@attrs.frozen
class Step:
    kind: str
    decision: Decision | None = None
    reason: Reason | None = None
    offer: tuple[Any, bytes] | None = None  # (detector, bytes) to elicit with
    header: ProxyHeader | None = None


_WAIT = Step(WAIT)
_PAUSE = Step(PAUSE)

# Whether the client's stream may begin with a PROXY header (`accept_proxy_protocol`).
HEADER_NONE = "none"  # the listener does not take PROXY headers at all
HEADER_EXPECTED = "expected"  # a trusted balancer: the stream must begin with one
HEADER_REFUSED = "refused"  # behind balancers, from someone else: a header is a forged address


class DetectionSession:
    """One client's detection: see the module's doc."""

    def __init__(
        self,
        detectors: DetectorSet,
        max_bytes: int,
        proxy_header: str = HEADER_NONE,
        datagrams: bool = False,
    ) -> None:
        self.detectors = detectors
        self.max_bytes = max_bytes
        self.proxy_header = proxy_header
        self.buffer = bytearray()  # the client's bytes after any PROXY header, not replayed
        self.held: list[bytes] = []  # a UDP client's first datagrams, boundaries kept
        self.held_bytes = 0
        self.datagrams = datagrams
        self.header: ProxyHeader | None = None
        self.elicited = b""  # what the router sent the client during detection
        self.elicited_by: Any = None  # the detector that asked for it (it rewrites the replay)
        self.decision: Decision | None = None
        self.progress = Progress()
        self._undecided = _WAIT  # what the last look said, while the flight is too short

    # What the client sends

    def feed(self, data: bytes) -> Step:
        """Bytes from a TCP client."""
        self.buffer += data
        if self.decision is not None:  # connecting: held for the replay
            return _PAUSE if len(self.buffer) > self.max_bytes else _WAIT
        if self.proxy_header == HEADER_EXPECTED:
            return self._take_header()
        if self.proxy_header == HEADER_REFUSED and proxyprotocol.starts_with_header(self.buffer):
            return self._refuse(Reason.PROXY_UNTRUSTED)
        return self._detect(final=False)

    def feed_datagram(self, datagram: bytes) -> Step:
        """A datagram from a UDP client; after the decision the caller relays them itself."""
        self.held.append(datagram)
        self.held_bytes += len(datagram)
        final = len(self.held) >= MAX_HELD_DATAGRAMS or self.held_bytes >= self.max_bytes
        return self._decide(Peek.of_datagrams(self.held), final)

    def resume(self) -> Step:
        """Go on after a HEADER step, once the caller admitted the client's address."""
        return self._detect(final=False) if self.buffer else _WAIT

    def end_of_stream(self) -> Step:
        """The client will send nothing more (TCP FIN)."""
        if self.decision is not None:
            return _WAIT
        if self.proxy_header == HEADER_EXPECTED:
            return self._refuse(Reason.PROXY_PROTOCOL)
        if not self.buffer:
            return self._refuse(Reason.CLIENT_CLOSED_EARLY)
        return self._detect(final=True)

    def timed_out(self) -> Step:
        """`detect.timeout` passed: undecided flights go to the listener's on_timeout route."""
        if self.decision is not None:
            return _WAIT
        if self.proxy_header == HEADER_EXPECTED:
            return self._refuse(Reason.PROXY_PROTOCOL)
        return self._decided(Decision(TIMEOUT))

    # What the router sends back

    def elicit(self, offer: tuple[Any, bytes]) -> bytes:
        """The ELICIT step's offer is being sent now: what to write to the client."""
        self.elicited_by, self.elicited = offer
        # Asked once: the next look offers nothing, and is made at the next bytes (what the
        # detectors see now includes what was sent).
        self._undecided = _WAIT
        self.progress.needed = 0
        return self.elicited

    def replay(self) -> tuple[bytes, Any]:
        """What the backend gets first (the bytes so far, without the client's answer to what
        was elicited), and the rewriter that goes on removing that answer from the rest of
        the stream (None when nothing was elicited or it is already gone)."""
        replay, self.buffer = bytes(self.buffer), bytearray()
        rewriter = None
        if self.elicited_by is not None:
            try:
                rewriter = self.elicited_by.rewriter()
            except Exception:
                log.failure(
                    "Detector {detector}'s rewriter raised; relaying unchanged",
                    detector=self.elicited_by.name,
                )
        if rewriter is not None:
            replay = rewriter.feed(replay)
        return replay, rewriter

    def take_held(self) -> list[bytes]:
        """A UDP session's held datagrams, to send to its server."""
        held, self.held, self.held_bytes = self.held, [], 0
        return held

    # Inside

    def _take_header(self) -> Step:
        header = proxyprotocol.parse_header(bytes(self.buffer))
        if header is INCOMPLETE:
            return _WAIT
        if not isinstance(header, ProxyHeader):
            return self._refuse(Reason.PROXY_PROTOCOL)
        self.proxy_header = HEADER_NONE
        self.header = header
        self.buffer = self.buffer[header.length :]
        return Step(HEADER, header=header)

    def _detect(self, final: bool) -> Step:
        max_bytes = self.max_bytes
        size = len(self.buffer)
        if size >= max_bytes:
            final = True
        elif not final and size < self.progress.needed:
            return self._undecided  # no detector's answer can have changed
        flight = bytes(self.buffer[:max_bytes] if size > max_bytes else self.buffer)
        return self._decide(Peek(flight, elicited=self.elicited), final)

    def _decide(self, peek: Peek, final: bool) -> Step:
        decision = self.detectors.decide(peek, final, self.progress)
        if decision is not None:
            return self._decided(decision)
        self._undecided = _WAIT
        if self.elicited_by is None and not self.datagrams:
            offer = self.detectors.elicit(peek)
            if offer is not None:
                self._undecided = Step(ELICIT, offer=offer)
        return self._undecided

    def _decided(self, decision: Decision) -> Step:
        if self.header is not None and self.header.fields:
            # What the balancer in front said, for routes and the log.
            fields = {k: safe_value(v) for k, v in self.header.fields.items()}
            decision = Decision(decision.protocol, {**decision.fields, **fields})
        self.decision = decision
        return Step(DECIDED, decision=decision)

    def _refuse(self, reason: Reason) -> Step:
        return Step(REFUSED, reason=reason)
