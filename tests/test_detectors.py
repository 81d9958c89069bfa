"""Every installed detector against every capture: right fields on its own, NEED_MORE or the
right answer on every prefix, and never a false MATCH on another protocol's bytes."""

import pytest

from l4router.detection import NEED_MORE, NO_MATCH, Match, Peek
from l4router.detection.decision import DetectorSet
from l4router.detection.registry import detectors_for, installed_detectors
from l4router.parsers.http2 import EMPTY_SETTINGS, SETTINGS_ACK, SettingsAckStripper
from tests.captures import ALSO_MATCHES, ELICITED, EXPECTED, capture, capture_names

DETECTORS = {d.name: d for d in detectors_for(installed_detectors(), "tcp")}
EVERY_CAPTURE = capture_names()


def peek(name, data=None):
    return Peek(
        capture(name) if data is None else data,
        elicited=EMPTY_SETTINGS if name in ELICITED else b"",
    )


def test_every_expected_protocol_has_a_detector():
    assert {protocol for protocol, _ in EXPECTED.values()} <= set(DETECTORS)
    assert len(DETECTORS) >= 14


@pytest.mark.parametrize("name", EVERY_CAPTURE)
def test_capture_is_decided_with_its_fields(name):
    protocol, fields = EXPECTED[name]
    decision = DetectorSet(DETECTORS.values()).decide(peek(name))
    assert decision.protocol == protocol
    assert {k: decision.fields.get(k) for k in fields} == fields


@pytest.mark.parametrize("name", EVERY_CAPTURE)
def test_own_detector_on_every_prefix(name):
    protocol, _ = EXPECTED[name]
    detector = DETECTORS[protocol]
    flight = capture(name)
    whole = detector.detect(peek(name))
    assert isinstance(whole, Match)
    for cut in range(len(flight)):
        verdict = detector.detect(peek(name, flight[:cut]))
        assert verdict is NEED_MORE or verdict == whole, (cut, verdict)


@pytest.mark.parametrize("name", EVERY_CAPTURE)
@pytest.mark.parametrize("detector_name", sorted(DETECTORS))
def test_no_false_match_on_other_protocols(name, detector_name):
    protocol, _ = EXPECTED[name]
    if detector_name == protocol or detector_name in ALSO_MATCHES.get(protocol, ()):
        return
    detector = DETECTORS[detector_name]
    flight = capture(name)
    for cut in range(len(flight) + 1):
        verdict = detector.detect(peek(name, flight[:cut]))
        assert not isinstance(verdict, Match), (cut, verdict)
    assert detector.detect(peek(name)) is NO_MATCH or flight.startswith(b"PRI ")


def test_decision_on_every_prefix_is_undecided_or_right():
    detectors = DetectorSet(DETECTORS.values())
    for name in EVERY_CAPTURE:
        protocol, _ = EXPECTED[name]
        flight = capture(name)
        for cut in range(1, len(flight)):
            decision = detectors.decide(peek(name, flight[:cut]))
            assert decision is None or decision.protocol == protocol, (name, cut, decision)


def test_grpc_waits_silently_then_elicits_settings():
    detectors = DetectorSet(DETECTORS.values())
    silent = Peek(capture("grpc_python_silent.bin"))
    assert len(silent.data) == 82
    assert detectors.decide(silent) is None
    detector, answer = detectors.elicit(silent)
    assert detector.name == "grpc" and answer == EMPTY_SETTINGS
    # Once elicited, the decision comes with the HEADERS, ACK or not ...
    flight = capture("grpc_python.bin")
    ack_at = flight.index(SETTINGS_ACK, 24)
    decision = detectors.decide(Peek(flight, elicited=EMPTY_SETTINGS))
    assert decision.protocol == "grpc"
    # ... and what reaches the backend is everything but that one ACK.
    assert (
        strip_in_pieces(flight, [len(flight)])
        == flight[:ack_at] + flight[ack_at + len(SETTINGS_ACK) :]
    )
    assert detector.rewriter().feed(flight[:ack_at]) == flight[:ack_at]  # nothing to strip yet


def strip_in_pieces(stream, cuts):
    stripper = SettingsAckStripper()
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(stripper.feed(stream[start:cut]))
        start = cut
    return b"".join(pieces) + stripper.feed(stream[start:])


@pytest.mark.parametrize("name", ["grpc_python.bin", "h2c_curl.bin"])
def test_the_elicited_ack_is_removed_at_every_split_point(name):
    """The ACK may come in the replay or later in the relay, split anywhere."""
    flight = capture(name)
    if SETTINGS_ACK not in flight[24:]:
        flight += SETTINGS_ACK  # curl's ACK follows its HEADERS
    flight += b"\x00\x00\x04\x00\x01\x00\x00\x00\x01data" + SETTINGS_ACK  # DATA, the backend's ACK
    ack_at = flight.index(SETTINGS_ACK, 24)
    expected = flight[:ack_at] + flight[ack_at + len(SETTINGS_ACK) :]
    for cut in range(len(flight) + 1):
        assert strip_in_pieces(flight, [cut]) == expected, cut
    for cut in range(0, len(flight), 7):
        assert strip_in_pieces(flight, list(range(cut, len(flight), 3))) == expected, cut


def test_no_elicitation_for_other_protocols():
    detectors = DetectorSet(DETECTORS.values())
    for name in EVERY_CAPTURE:
        flight = capture(name)
        for cut in range(len(flight)):
            offer = detectors.elicit(Peek(flight[:cut]))
            if offer is not None:
                assert flight.startswith(b"PRI * HTTP/2.0"), name


def test_every_installed_detector_of_any_transport_survives_every_capture():
    for detector in installed_detectors():
        for name in EVERY_CAPTURE:
            verdict = detector.detect(Peek(capture(name)))
            assert verdict in (NEED_MORE, NO_MATCH) or isinstance(verdict, Match)


def _decide_asking_everyone(detectors, peek, final):
    """The decision rule without the first-byte table, to check the table changes nothing."""
    everyone = DetectorSet(detectors)
    everyone._by_first_byte = [everyone.detectors] * 256
    return everyone.decide(peek, final)


def test_first_byte_table_changes_no_decision():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    detectors = list(DETECTORS.values())
    with_table = DetectorSet(detectors)
    captures = [capture(name) for name in EVERY_CAPTURE]

    @settings(max_examples=1500, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from(captures).flatmap(
                lambda c: st.integers(0, len(c)).map(lambda cut: c[:cut])
            ),
        )
    )
    def check(data):
        for final in (False, True):
            peek = Peek(data)
            assert with_table.decide(peek, final) == _decide_asking_everyone(
                detectors, Peek(data), final
            )

    check()


def test_h2c_is_decided_by_its_headers_even_when_elicited_before_them():
    """curl may send its HEADERS before it has read the router's SETTINGS: the decision comes
    with the HEADERS (the ACK that follows is removed in flight, not waited for)."""
    detectors = DetectorSet(DETECTORS.values())
    flight = capture("h2c_curl.bin")
    preface_and_settings = 24 + 9 + int.from_bytes(flight[24:27], "big")
    detector, answer = detectors.elicit(Peek(flight[:preface_and_settings]))
    assert detector.name in ("grpc", "h2c") and answer == EMPTY_SETTINGS
    decision = detectors.decide(Peek(flight, elicited=EMPTY_SETTINGS))
    assert decision.protocol == "h2c" and decision.fields["authority"]
    assert detector.rewriter().feed(flight + SETTINGS_ACK) == flight
