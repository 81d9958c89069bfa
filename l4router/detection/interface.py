"""The detector contract: the stable, public plugin API."""

import enum
from collections.abc import Mapping
from types import MappingProxyType

from zope.interface import Attribute, Interface


class IProtocolDetector(Interface):
    """Recognises one protocol from the first bytes a client sends."""

    name = Attribute("protocol name used in config and metrics, e.g. 'tls'")
    transports = Attribute("frozenset of 'tcp' and/or 'udp'")
    priority = Attribute("int; lower is asked first (more specific before more general)")

    def detect(peek):
        """Return Match(fields), NEED_MORE or NO_MATCH. Never raises on any input."""

    # Optional, asked only when present:
    #   first_bytes: frozenset of the values the protocol's first byte can take
    #   fields: tuple of the field names it can produce (config checks routes against them)
    #   elicit(peek) -> bytes | None: what to send a client that waits for the server
    #   rewriter() -> object with feed(data) -> data and `done`: removes the client's answer
    #       to what was elicited from its stream
    #   detect_truncated(peek) -> Match | NO_MATCH: asked when no more bytes will come
    #       (detect.max_bytes reached, or the client closed) and detect still says NEED_MORE;
    #       a Match says the bytes so far already prove the protocol (fields with
    #       truncated=True), instead of the flight counting as not this protocol


class Verdict(enum.Enum):
    """A detector's answer when it does not match (yet)."""

    NEED_MORE = "need_more"
    NO_MATCH = "no_match"


NEED_MORE = Verdict.NEED_MORE
NO_MATCH = Verdict.NO_MATCH


class Match:
    """A positive verdict with the flat mapping of what was learnt (sni, alpn, host, ...)."""

    __slots__ = ("fields",)

    def __init__(self, fields=None):
        if fields is None:
            fields = {}
        if not isinstance(fields, Mapping):
            raise TypeError(f"Match takes a mapping of fields, not {type(fields).__name__}")
        self.fields = MappingProxyType(dict(fields))

    def __eq__(self, other):
        return isinstance(other, Match) and dict(self.fields) == dict(other.fields)

    def __hash__(self):
        return hash(tuple(sorted(self.fields)))

    def __repr__(self):
        return f"Match({dict(self.fields)!r})"
