"""The detection session without a reactor: every capture at every split point, the PROXY
header in pieces, elicitation and the replay, max_bytes, datagrams, end of stream and timeout."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l4router.connection.reasons import Reason
from l4router.detection.decision import DetectorSet
from l4router.detection.interface import NEED_MORE
from l4router.detection.peek import Peek
from l4router.detection.registry import detectors_for, installed_detectors
from l4router.detection.session import (
    DECIDED,
    ELICIT,
    HEADER,
    HEADER_EXPECTED,
    HEADER_REFUSED,
    PAUSE,
    REFUSED,
    WAIT,
    DetectionSession,
)
from l4router.parsers.http2 import EMPTY_SETTINGS, PREFACE, SETTINGS_ACK
from l4router.parsers.proxyprotocol import v1_header, v2_header
from tests.captures import ELICITED, EXPECTED, capture, capture_names
from tests.test_udp_detectors import UDP_EXPECTED, datagrams

TCP = DetectorSet(detectors_for(installed_detectors(), "tcp"))
UDP = DetectorSet(detectors_for(installed_detectors(), "udp"))
SPOKEN_FIRST = [n for n in capture_names() if n not in ELICITED]


def session(header=None, max_bytes=16384):
    return DetectionSession(TCP, max_bytes, header or "none")


def fed(detection, *pieces):
    """The steps of feeding `pieces` one after another, up to the first that is neither WAIT
    nor ELICIT (an offer made only if the client goes quiet: this one goes on sending)."""
    steps = []
    for piece in pieces:
        steps.append(detection.feed(piece))
        if steps[-1].kind not in (WAIT, ELICIT):
            break
    return steps


@pytest.mark.parametrize("name", SPOKEN_FIRST)
def test_every_capture_at_every_split_point_is_decided_once_and_replayed_whole(name):
    flight = capture(name)
    protocol, fields = EXPECTED[name]
    whole = TCP.decide(Peek(flight))
    for cut in range(len(flight) + 1):
        detection = session()
        steps = fed(detection, flight[:cut], flight[cut:])
        assert all(s.kind in (WAIT, ELICIT) for s in steps[:-1]), cut
        last = steps[-1]
        assert last.kind == DECIDED, (cut, last)
        assert last.decision.protocol == protocol
        assert {k: last.decision.fields.get(k) for k in fields} == fields
        if len(steps) == 2:  # decided on the whole flight: as the detectors say of it
            assert last.decision == whole
        rest = flight[cut:] if len(steps) == 1 else b""
        assert detection.feed(rest).kind == WAIT  # held while the backend connects
        replay, rewriter = detection.replay()
        assert replay == flight and rewriter is None


@pytest.mark.parametrize("version", [1, 2])
def test_a_proxy_header_in_pieces_names_the_source_and_is_not_replayed(version):
    if version == 1:
        header = v1_header("203.0.113.7", 40000, "192.0.2.1", 443)
    else:
        header = v2_header("2001:db8::7", 40000, "2001:db8::1", 443, b"\x02\x00\x08one.test")
    flight = capture("http1_curl.bin")
    stream = header + flight
    for cut in range(len(stream)):
        detection = session(HEADER_EXPECTED)
        headers, decisions = [], []
        for piece in (stream[:cut], stream[cut:]):
            step = detection.feed(piece)
            if step.kind == HEADER:
                headers.append(step.header)
                step = detection.resume()
            if step.kind == DECIDED:
                decisions.append(step.decision)
        assert len(headers) == 1 and len(decisions) == 1, cut
        assert headers[0].source in ("203.0.113.7", "2001:db8::7")
        assert headers[0].source_port == 40000
        assert decisions[0].protocol == "http1"
        if version == 2:
            assert decisions[0].fields["pp_authority"] == "one.test"
        assert detection.replay() == (flight, None)


def test_a_header_that_is_missing_malformed_or_from_an_untrusted_peer_is_refused():
    assert session(HEADER_EXPECTED).feed(b"GET / HTTP/1.1\r\n\r\n").reason == Reason.PROXY_PROTOCOL
    assert session(HEADER_EXPECTED).feed(b"PROXY TCP4 nonsense\r\n").reason == Reason.PROXY_PROTOCOL
    waiting = session(HEADER_EXPECTED)
    assert waiting.feed(b"PROXY TCP4 1.2.3.4").kind == WAIT
    assert waiting.end_of_stream().reason == Reason.PROXY_PROTOCOL
    assert session(HEADER_EXPECTED).timed_out().reason == Reason.PROXY_PROTOCOL
    forged = v1_header("203.0.113.7", 1, "192.0.2.1", 2) + b"GET / HTTP/1.1\r\n\r\n"
    step = session(HEADER_REFUSED).feed(forged)
    assert (step.kind, step.reason) == (REFUSED, Reason.PROXY_UNTRUSTED)
    # Behind balancers, someone else's stream without a header is detected as usual.
    assert session(HEADER_REFUSED).feed(capture("http1_curl.bin")).kind == DECIDED


def test_a_waiting_grpc_client_is_elicited_and_its_ack_is_removed_from_the_replay():
    silent = capture("grpc_python_silent.bin")
    flight = capture("grpc_python.bin")
    assert flight.startswith(silent)
    detection = session()
    step = detection.feed(silent)
    assert step.kind == ELICIT
    assert detection.elicit(step.offer) == EMPTY_SETTINGS
    step = detection.feed(flight[len(silent) :])
    assert step.kind == DECIDED and step.decision.protocol == "grpc"
    replay, rewriter = detection.replay()
    ack_at = flight.index(SETTINGS_ACK, len(silent))
    assert replay == flight[:ack_at] + flight[ack_at + len(SETTINGS_ACK) :]
    assert rewriter is not None


def test_once_elicited_a_client_sending_the_rest_byte_by_byte_is_never_offered_it_again():
    silent = capture("grpc_python_silent.bin")
    flight = capture("grpc_python.bin")
    detection = session()
    step = detection.feed(silent)
    detection.elicit(step.offer)
    steps = [detection.feed(flight[i : i + 1]) for i in range(len(silent), len(flight))]
    decided = [s for s in steps if s.kind != WAIT]
    assert [s.kind for s in decided] == [DECIDED]
    assert decided[0].decision.protocol == "grpc"


@pytest.mark.parametrize("request_line", [b"PUT / HTTP/1.0\r\n\r\n", b"POST / HTTP/1.0\r\n\r\n"])
def test_a_short_request_that_starts_like_the_http2_preface_is_decided_in_two_segments(
    request_line,
):
    """'P' could begin the HTTP/2 preface; the next byte off it is answered at once, not at
    the preface's length (which this whole request is shorter than)."""
    detection = session()
    assert detection.feed(request_line[:1]).kind == WAIT
    step = detection.feed(request_line[1:])
    assert step.kind == DECIDED and step.decision.protocol == "http1"


def test_max_bytes_ends_detection_and_then_pauses_reading_while_connecting():
    detection = session(max_bytes=64)
    head = b"GET /" + b"a" * 100
    step = detection.feed(head)
    assert step.kind == DECIDED and step.decision.protocol == "unknown"
    assert detection.feed(b"more").kind == PAUSE
    assert detection.replay() == (head + b"more", None)


def test_end_of_stream_decides_what_came_or_says_it_came_to_nothing():
    nothing = session().end_of_stream()
    assert (nothing.kind, nothing.reason) == (REFUSED, Reason.CLIENT_CLOSED_EARLY)
    cut = session()
    assert cut.feed(b"SSH-2.0-Open").kind == WAIT
    assert cut.end_of_stream().decision.protocol == "unknown"


def test_timeout_gives_the_timeout_protocol_and_nothing_after_a_decision():
    assert session().timed_out().decision.protocol == "timeout"
    decided = session()
    decided.feed(capture("ssh_openssh.bin"))
    assert decided.timed_out().kind == WAIT


@pytest.mark.parametrize("name", sorted(UDP_EXPECTED))
def test_datagrams_are_held_until_decided_and_handed_over_whole(name):
    protocol, fields = UDP_EXPECTED[name]
    sent = datagrams(name)
    detection = DetectionSession(UDP, 16384, datagrams=True)
    steps = [detection.feed_datagram(d) for d in sent]
    assert [s.kind for s in steps] == [WAIT] * (len(sent) - 1) + [DECIDED]
    decision = steps[-1].decision
    assert decision.protocol == protocol
    assert {k: decision.fields.get(k) for k in fields} == fields
    assert detection.take_held() == sent


class CountingDetector:
    """A detector that counts how often it is asked, and how many bytes it was shown."""

    def __init__(self, detector):
        self.detector = detector
        self.asked = 0
        self.bytes_shown = 0

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def detect(self, peek):
        self.asked += 1
        self.bytes_shown += len(peek.data)
        return self.detector.detect(peek)


HINTED = [n for n in SPOKEN_FIRST if EXPECTED[n][0] in ("tls", "h2c", "grpc")]


@pytest.mark.parametrize("name", SPOKEN_FIRST)
def test_a_flight_fed_byte_by_byte_asks_each_detector_a_bounded_number_of_times(name):
    """Work linear in the flight's bytes: a detector that said NO_MATCH is not asked again,
    and one that needs more is asked again once the flight reaches the length it named."""
    flight = capture(name)
    counting = [CountingDetector(d) for d in detectors_for(installed_detectors(), "tcp")]
    detection = DetectionSession(DetectorSet(counting), 16384, "none")
    steps = [detection.feed(flight[i : i + 1]) for i in range(len(flight))]
    decided = [s for s in steps if s.kind == DECIDED]
    assert len(decided) == 1 and decided[0].decision == TCP.decide(Peek(flight))
    asked = {d.name: d.asked for d in counting if d.asked}
    # At each byte only the detector waiting for more is asked (and those saying NO_MATCH,
    # once per flight), not every detector again: HTTP/1's flights name no length (their
    # parse is a search for the end of the head, in C), so they are looked at every byte.
    assert sum(asked.values()) <= len(flight) + 2 * len(counting), asked
    if name in HINTED:  # at the end of the record or frame under way: a few looks (and
        # every byte of HTTP/2's 24-byte preface, where a byte off it is answered at once)
        looks = 12 + len(counting) + (len(PREFACE) if flight.startswith(PREFACE) else 0)
        assert sum(asked.values()) <= looks, asked
        shown = sum(d.bytes_shown for d in counting)
        assert shown <= looks * len(flight), (shown, len(flight))


@pytest.mark.parametrize("name", HINTED)
def test_the_length_a_detector_names_is_never_past_where_its_answer_changes(name):
    flight = capture(name)
    for detector in detectors_for(installed_detectors(), "tcp"):
        if detector.name != EXPECTED[name][0]:
            continue
        for cut in range(1, len(flight)):
            peek = Peek(flight[:cut])
            if detector.detect(peek) is not NEED_MORE:
                continue
            needed = detector.bytes_needed(peek)
            assert needed > cut
            before = Peek(flight[: needed - 1])
            if needed - 1 > cut:  # still waiting, and offering the same, one byte short of it
                assert detector.detect(before) is NEED_MORE, (cut, needed)
                assert detector.elicit(before) == detector.elicit(peek), (cut, needed)


SHORT_FLIGHTS = [
    b"PUT / HTTP/1.0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
    b"SSH-2.0-x\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("source", SPOKEN_FIRST + SHORT_FLIGHTS)
@settings(max_examples=60, deadline=None)
@given(
    cut=st.integers(min_value=0), cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=40)
)
@example(cut=0, cuts=[1])  # the first byte alone (once held a short PUT until the timeout)
def test_any_segmentation_decides_as_soon_and_as_the_whole_flight(source, cut, cuts):
    """Fed in any segments, a flight (or any prefix of it) is decided as it is fed whole: with
    the same decision, and before its end of stream exactly when the whole one is."""
    flight = capture(source) if isinstance(source, str) else source
    flight = flight[: cut % (len(flight) + 1)] or flight
    whole = session()
    expected = whole.feed(flight)
    decided_early = expected.kind in (DECIDED, REFUSED)
    if not decided_early:
        expected = whole.end_of_stream()
    segmented = session()
    pieces, start = [], 0
    for size in cuts:
        pieces.append(flight[start : start + size])
        start += size
    pieces.append(flight[start:])
    steps = [segmented.feed(piece) for piece in pieces if piece]
    final = [s for s in steps if s.kind in (DECIDED, REFUSED)]
    assert bool(final) == decided_early
    if not final:
        final = [segmented.end_of_stream()]
    assert (final[0].kind, final[0].decision) == (expected.kind, expected.decision)
