"""The decision loop: detectors in priority order; the first MATCH wins once every detector
before it has said NO_MATCH."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger

from l4router.detection.interface import NEED_MORE, NO_MATCH, Match, Verdict
from l4router.detection.peek import Peek
from l4router.detection.registry import complete

log = Logger()

UNKNOWN = "unknown"
TIMEOUT = "timeout"
MAX_FIELD_LENGTH = 1024  # a field is client data: bounded, so is every log line it goes to
# C0, DEL and C1 controls, and the Unicode line and paragraph separators: each can start a
# new line or an escape sequence in a terminal or in a tool that re-renders the log.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
# Whether a value has any of them: a search in C, where translate looks up every character
# (2.5 us for a user agent; nearly every value has none).
_HAS_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def safe_value(value: Any) -> Any:
    """A field value fit for logs and metrics: control characters (newlines, ANSI escapes,
    C1 controls, Unicode line separators) escaped, length bounded; tuples of strings likewise."""
    if isinstance(value, str):
        if _HAS_CONTROL.search(value) is None:
            return value[:MAX_FIELD_LENGTH]
        return value.translate(_CONTROL)[:MAX_FIELD_LENGTH]
    if isinstance(value, tuple):
        return tuple(safe_value(v) for v in value[:64])
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return safe_value(str(value))


def _safe_fields(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """safe_value of every field, and names bounded; the common value (a short string with
    no control character) checked inline: this runs for every connection."""
    safe = {}
    for name, value in fields.items():
        if type(name) is not str or len(name) > 64:
            name = str(name)[:64]
        if not (
            type(value) is str
            and len(value) <= MAX_FIELD_LENGTH
            and _HAS_CONTROL.search(value) is None
        ):
            value = safe_value(value)
        safe[name] = value
    return safe


@attrs.frozen
class Decision:
    protocol: str
    fields: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Progress:
    """How far one flight's detection got, so that more bytes do not repeat it: the first
    `skip` candidates said NO_MATCH (which more bytes never change), and the one after them
    needs the flight to reach `needed` bytes before its answer can change."""

    skip: int = 0
    needed: int = 0


class DetectorSet:
    """The detectors of one listener, ordered; a misbehaving plugin is logged once and ignored.

    A detector whose `first_bytes` (the values the first byte of its protocol can take) leave
    out a flight's first byte cannot match it and is not asked (it counts as NO_MATCH), which
    spares a TLS ClientHello a dozen calls. A detector with first_bytes None is always asked.
    """

    def __init__(self, detectors: Iterable[Any]) -> None:
        self.detectors = tuple(sorted(map(complete, detectors), key=lambda d: (d.priority, d.name)))
        self._failed: set[str] = set()
        self._unhinted: set[str] = set()  # detectors whose bytes_needed raised: not asked
        self._by_first_byte = [
            tuple(d for d in self.detectors if d.first_bytes is None or byte in d.first_bytes)
            for byte in range(256)
        ]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.detectors)

    def decide(
        self, peek: Peek, final: bool = False, progress: Progress | None = None
    ) -> Decision | None:
        """A Decision, or None while a detector that could still win needs more bytes.

        `final`: no more bytes will be considered (max_bytes reached or the client closed), so
        the undecided count as NO_MATCH. `progress`: where the previous, shorter peek of the
        same flight left off (updated); it must then have said None.
        """
        data = peek.data
        candidates = self._by_first_byte[data[0]] if data else self.detectors
        start = progress.skip if progress is not None and data else 0
        for index in range(start, len(candidates)):
            detector = candidates[index]
            if detector.name in self._failed:
                continue
            verdict = self._ask(detector, peek)
            if verdict is NEED_MORE:
                if not final:
                    if progress is not None:
                        progress.skip = index
                        progress.needed = self._bytes_needed(detector, peek)
                    return None
                verdict = self._ask_truncated(detector, peek)
            if isinstance(verdict, Match):
                return Decision(detector.name, _safe_fields(verdict.fields))
        return Decision(UNKNOWN)

    def elicit(self, peek: Peek) -> tuple[Any, bytes] | None:
        """(detector, bytes) from the first detector that wants to draw more bytes out of a
        client that waits for the server (grpcio waits for the server's SETTINGS), or None."""
        for detector in self.detectors:
            if detector.name in self._failed:
                continue
            try:
                answer = detector.elicit(peek)
            except Exception:
                self._failed.add(detector.name)
                log.failure(
                    "Detector {detector}'s elicit raised; it is skipped from now on",
                    detector=detector.name,
                )
                continue
            if answer:
                return detector, bytes(answer)
        return None

    def _bytes_needed(self, detector: Any, peek: Peek) -> int:
        """What `detector` says the flight must reach before asking it again (at least one
        byte more; a plugin that fails here is asked at every byte)."""
        more = len(peek.data) + 1
        if detector.name in self._unhinted:
            return more
        try:
            needed = detector.bytes_needed(peek)
        except Exception:
            self._unhinted.add(detector.name)
            log.failure(
                "Detector {detector}'s bytes_needed raised; it is asked at every byte from now on",
                detector=detector.name,
            )
            return more
        return needed if isinstance(needed, int) and needed > more else more

    def _ask_truncated(self, detector: Any, peek: Peek) -> Match | Verdict:
        """No more bytes will come and `detector` still needs some: a detector whose first
        bytes already prove its protocol says so (`detect_truncated`), instead of the flight
        counting as not its protocol."""
        return self._ask(detector, peek, detector.detect_truncated)

    def _ask(
        self, detector: Any, peek: Peek, method: Callable[[Peek], Any] | None = None
    ) -> Match | Verdict:
        try:
            verdict = (method or detector.detect)(peek)
        except Exception:
            self._failed.add(detector.name)
            log.failure(
                "Detector {detector} raised; it is skipped from now on", detector=detector.name
            )
            return NO_MATCH
        if verdict is NEED_MORE or verdict is NO_MATCH or isinstance(verdict, Match):
            return verdict
        self._failed.add(detector.name)
        log.error(
            "Detector {detector} returned {verdict!r}, not Match/NEED_MORE/NO_MATCH; "
            "it is skipped from now on",
            detector=detector.name,
            verdict=verdict,
        )
        return NO_MATCH
