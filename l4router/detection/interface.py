"""The detector contract: the stable, public plugin API."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from zope.interface import Attribute, Interface


class IProtocolDetector(Interface):  # type: ignore[misc]  # zope's Interface is untyped
    """Recognises one protocol from the first bytes a client sends.

    `name`, `transports`, `priority` and `detect` are required. The other members are
    optional: a plugin that leaves one out gets its default (registry.DeclaredDetector says
    which), so older plugins keep working unchanged.
    """

    name = Attribute("protocol name used in config and metrics, e.g. 'tls'")
    transports = Attribute("frozenset of 'tcp' and/or 'udp'")
    priority = Attribute("int; lower is asked first (more specific before more general)")
    first_bytes = Attribute(
        "optional frozenset of the values the protocol's first byte can take: the detector is "
        "not asked about flights that start otherwise (default None: asked about every one)"
    )
    fields = Attribute(
        "optional tuple of the field names it can produce; the config checks routes against "
        "them (default None: not declared, any field name is accepted)"
    )

    def detect(peek):  # type: ignore[no-untyped-def]  # zope's interface method style
        """Return Match(fields), NEED_MORE or NO_MATCH. Never raises on any input."""

    def detect_truncated(peek):  # type: ignore[no-untyped-def]
        """Optional. Asked when no more bytes will come (detect.max_bytes reached, or the
        client closed) and detect still says NEED_MORE: a Match (fields with truncated=True)
        says the bytes so far already prove the protocol; NO_MATCH that they do not."""

    def bytes_needed(peek):  # type: ignore[no-untyped-def]
        """Optional. Asked when detect said NEED_MORE: the length the flight must reach before
        detect (or elicit) can answer anything else, e.g. the end of the record or frame under
        way; detection waits for it instead of asking again at every segment, so the work for
        a flight stays linear in its bytes. Default: one byte more."""

    def elicit(peek):  # type: ignore[no-untyped-def]
        """Optional. Bytes to send a client that waits for the server before it says enough
        (grpcio waits for the server's SETTINGS), or None."""

    def rewriter():  # type: ignore[no-untyped-def,misc]
        """Optional, with elicit. An object with feed(data) -> data that removes the client's
        answer to what was elicited from its stream (the backend never asked for it)."""


class Verdict(enum.Enum):
    """A detector's answer when it does not match (yet)."""

    NEED_MORE = "need_more"
    NO_MATCH = "no_match"


NEED_MORE = Verdict.NEED_MORE
NO_MATCH = Verdict.NO_MATCH


class ProtocolDetector:
    """A base for detector plugins that gives the optional members of IProtocolDetector their
    defaults; a subclass sets name, transports and priority and writes detect."""

    name: str
    transports: frozenset[str]
    priority: int
    first_bytes: frozenset[int] | None = None
    fields: tuple[str, ...] | None = None

    def detect(self, peek: Any) -> Match | Verdict:
        raise NotImplementedError

    def detect_truncated(self, peek: Any) -> Match | Verdict:
        return NO_MATCH

    def bytes_needed(self, peek: Any) -> int:
        return len(peek.data) + 1

    def elicit(self, peek: Any) -> bytes | None:
        return None

    def rewriter(self) -> Any:
        return None


class Match:
    """A positive verdict with the flat mapping of what was learnt (sni, alpn, host, ...)."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, Any] | None = None) -> None:
        if fields is None:
            fields = {}
        if not isinstance(fields, Mapping):
            raise TypeError(f"Match takes a mapping of fields, not {type(fields).__name__}")
        self.fields = MappingProxyType(dict(fields))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Match) and dict(self.fields) == dict(other.fields)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.fields)))

    def __repr__(self) -> str:
        return f"Match({dict(self.fields)!r})"
