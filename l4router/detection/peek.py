"""The bytes a client sent so far, with parses cached so ten detectors parse them once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from l4router.parsers import Incomplete, Invalid, http1, http2, tls

Parsed = TypeVar("Parsed")
_UNPARSED: Any = object()


class Peek:
    """An immutable snapshot of the first bytes; a new one is made when more bytes arrive.

    Parses are computed on first use and cached on the snapshot. A third-party detector caches
    its own parser with `peek.parsed(function)`.
    """

    __slots__ = ("data", "transport", "elicited", "datagrams", "_tls", "_http1", "_h2", "__dict__")
    _tls: tls.ClientHello | Incomplete | Invalid
    _http1: http1.Request | Incomplete | Invalid
    _h2: http2.Request | Incomplete | Invalid

    def __init__(
        self,
        data: bytes,
        transport: str = "tcp",
        elicited: bytes = b"",
        datagrams: Sequence[bytes] = (),
    ) -> None:
        self.data = bytes(data)
        self.transport = transport
        self.elicited = elicited  # what the router sent the client to draw out more bytes
        # UDP: the client's first datagrams, boundaries kept (TCP: the bytes as one).
        self.datagrams = tuple(datagrams) or (self.data,)
        self._tls = self._http1 = self._h2 = _UNPARSED

    @classmethod
    def of_datagrams(cls, datagrams: Sequence[bytes]) -> Peek:
        return cls(b"".join(datagrams), transport="udp", datagrams=datagrams)

    def parsed(self, parser: Callable[[bytes], Parsed]) -> Parsed:
        """`parser(self.data)`, computed once per snapshot."""
        cache: dict[Callable[[bytes], Any], Any] = self.__dict__.setdefault("_parsed", {})
        result: Parsed
        try:
            result = cache[parser]
        except KeyError:
            result = cache[parser] = parser(self.data)
        return result

    # The parsers every built-in detector shares, cached in slots: functools.cached_property
    # takes a lock on every first use (Python 3.11), a microsecond per parse per connection.

    @property
    def tls_client_hello(self) -> tls.ClientHello | Incomplete | Invalid:
        parsed = self._tls
        if parsed is _UNPARSED:
            parsed = self._tls = tls.parse_client_hello(self.data)
        return parsed

    @property
    def http1_request(self) -> http1.Request | Incomplete | Invalid:
        parsed = self._http1
        if parsed is _UNPARSED:
            parsed = self._http1 = http1.parse_request(self.data)
        return parsed

    @property
    def h2_first_headers(self) -> http2.Request | Incomplete | Invalid:
        parsed = self._h2
        if parsed is _UNPARSED:
            parsed = self._h2 = http2.parse_first_request(self.data)
        return parsed
