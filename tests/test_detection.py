"""The decision loop and plugin discovery."""

import sys
import textwrap

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.plugin import IPlugin
from zope.interface import implementer
from zope.interface.verify import verifyObject

from l4router.detection import NEED_MORE, NO_MATCH, IProtocolDetector, Match, Peek
from l4router.detection.decision import (
    _CONTROL,
    MAX_FIELD_LENGTH,
    DetectorSet,
    Progress,
    _safe_fields,
    safe_value,
)
from l4router.detection.registry import detectors_for, installed_detectors
from tests.captures import EXPECTED, capture


@implementer(IPlugin, IProtocolDetector)
class Scripted:
    """A detector whose verdict is given: the decision loop's rules are about verdicts."""

    transports = frozenset({"tcp"})

    def __init__(self, name, priority, verdict):
        self.name, self.priority, self.verdict = name, priority, verdict
        self.asked = 0

    def detect(self, peek):
        self.asked += 1
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


def test_first_match_in_priority_order_wins():
    late = Scripted("late", 20, Match({"a": 1}))
    early = Scripted("early", 10, Match({"b": 2}))
    decision = DetectorSet([late, early]).decide(Peek(b"x"))
    assert (decision.protocol, decision.fields) == ("early", {"b": 2})


def test_match_waits_while_an_earlier_detector_needs_more():
    waiting = Scripted("waiting", 10, NEED_MORE)
    matching = Scripted("matching", 20, Match({}))
    detectors = DetectorSet([waiting, matching])
    assert detectors.decide(Peek(b"x")) is None
    assert matching.asked == 0  # nothing later can win yet: not asked
    assert detectors.decide(Peek(b"x"), final=True).protocol == "matching"


def test_all_no_match_is_unknown():
    detectors = DetectorSet([Scripted("a", 1, NO_MATCH), Scripted("b", 2, NO_MATCH)])
    decision = detectors.decide(Peek(b"x"))
    assert (decision.protocol, decision.fields) == ("unknown", {})


def test_a_raising_or_lying_detector_is_skipped_for_good():
    broken = Scripted("broken", 1, ValueError("boom"))
    liar = Scripted("liar", 2, "yes")
    fine = Scripted("fine", 3, Match({}))
    detectors = DetectorSet([broken, liar, fine])
    assert detectors.decide(Peek(b"x")).protocol == "fine"
    assert detectors.decide(Peek(b"x")).protocol == "fine"
    assert (broken.asked, liar.asked) == (1, 1)


class BadHint(Scripted):
    """Needs more, and its bytes_needed raises (or says something that is not a length)."""

    def __init__(self, name, priority, hint):
        super().__init__(name, priority, NEED_MORE)
        self.hint = hint
        self.hinted = 0

    def bytes_needed(self, peek):
        self.hinted += 1
        if isinstance(self.hint, Exception):
            raise self.hint
        return self.hint


def test_a_length_that_is_no_length_means_one_byte_more_and_a_raising_one_is_not_asked_again():
    for hint, asked_again in ((ValueError("boom"), False), ("soon", True), (0, True)):
        detector = BadHint("hinting", 1, hint)
        detectors = DetectorSet([detector])
        for size in (1, 2, 3):
            progress = Progress()
            assert detectors.decide(Peek(b"x" * size), progress=progress) is None
            assert progress.needed == size + 1
        assert detector.hinted == (3 if asked_again else 1)
        assert detectors.decide(Peek(b"xyz"), final=True).protocol == "unknown"


def test_installed_detectors_on_every_capture_and_prefix():
    detectors = DetectorSet(detectors_for(installed_detectors(), "tcp"))
    for name, (protocol, fields) in EXPECTED.items():
        flight = capture(name)
        decision = detectors.decide(Peek(flight))
        assert decision.protocol == protocol, name
        assert {k: decision.fields.get(k) for k in fields} == fields, name
        for cut in range(1, len(flight)):
            early = detectors.decide(Peek(flight[:cut]))
            assert early is None or early.protocol == protocol, (name, cut)


def test_peek_caches_parses_once_per_snapshot():
    calls = []

    def parser(data):
        calls.append(data)
        return len(data)

    peek = Peek(b"abc")
    assert peek.parsed(parser) == 3 and peek.parsed(parser) == 3
    assert calls == [b"abc"]
    assert peek.tls_client_hello is peek.tls_client_hello


def test_a_dropped_in_plugin_is_found(tmp_path, monkeypatch):
    folder = tmp_path / "l4router" / "plugins"
    folder.mkdir(parents=True)
    (folder / "third_party_echo.py").write_text(
        textwrap.dedent("""
        from twisted.plugin import IPlugin
        from zope.interface import implementer
        from l4router.detection import IProtocolDetector, Match, NEED_MORE, NO_MATCH

        @implementer(IPlugin, IProtocolDetector)
        class Echo:
            name = "echo_proto"
            transports = frozenset({"tcp"})
            priority = 50
            def detect(self, peek):
                if len(peek.data) < 4:
                    return NEED_MORE
                return Match({"word": "echo"}) if peek.data[:4] == b"ECHO" else NO_MATCH

        echo = Echo()
    """)
    )
    import l4router.plugins

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        l4router.plugins, "__path__", list(l4router.plugins.__path__) + [str(folder)]
    )
    found = {d.name: d for d in installed_detectors()}
    assert "echo_proto" in found and "tls" in found
    decision = DetectorSet(found.values()).decide(Peek(b"ECHO hi"))
    assert decision.protocol == "echo_proto"
    # Written without the optional members: it has their defaults, so it is not asked about
    # elicitation and a cut flight is not its protocol.
    echo = found["echo_proto"]
    assert echo.first_bytes is None and echo.fields is None
    assert echo.elicit(Peek(b"ECH")) is None and echo.rewriter() is None
    assert echo.detect_truncated(Peek(b"ECH")) is NO_MATCH
    assert DetectorSet([echo]).decide(Peek(b"ECH"), final=True).protocol == "unknown"
    # Written without the optional members: it has their defaults, so it is not asked about
    # elicitation and a cut flight is not its protocol.
    echo = found["echo_proto"]
    assert echo.first_bytes is None and echo.fields is None
    assert echo.elicit(Peek(b"ECH")) is None and echo.rewriter() is None
    assert echo.detect_truncated(Peek(b"ECH")) is NO_MATCH
    assert DetectorSet([echo]).decide(Peek(b"ECH"), final=True).protocol == "unknown"
    sys.modules.pop("l4router.plugins.third_party_echo", None)


def test_every_installed_detector_provides_the_whole_contract():
    """Ours derive from ProtocolDetector: every member IProtocolDetector declares is there."""
    for detector in installed_detectors():
        assert verifyObject(IProtocolDetector, detector), detector.name


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x2100), max_size=1200))
def test_a_field_value_is_escaped_the_same_whether_or_not_it_has_a_control_character(text):
    """safe_value skips the translation when a value has no control character; what it
    returns must be what the translation gives in every case (bounded to the same length)."""
    assert safe_value(text) == text.translate(_CONTROL)[:MAX_FIELD_LENGTH]
    assert "\n" not in safe_value(text) and "\x1b" not in safe_value(text)


_FIELD_TEXT = st.text(alphabet=st.characters(max_codepoint=0x2100), max_size=1100)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.one_of(_FIELD_TEXT, st.integers()),
        st.one_of(
            _FIELD_TEXT,
            st.integers(),
            st.booleans(),
            st.none(),
            st.tuples(_FIELD_TEXT, _FIELD_TEXT),
            st.binary(max_size=20),
        ),
        max_size=6,
    )
)
@example({"user_agent": "a" * (MAX_FIELD_LENGTH + 1), "k" * 65: "v", 7: "x\n"})
def test_a_decisions_fields_are_made_safe_as_safe_value_makes_each(fields):
    """The decision checks the common value (a short plain string) inline: every field must
    come out as safe_value and the bounded name make it."""
    expected = {str(k)[:64]: safe_value(v) for k, v in fields.items()}
    assert _safe_fields(fields) == expected
