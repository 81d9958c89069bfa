"""The bytes a client sent so far, with parses cached so ten detectors parse them once."""

from functools import cached_property

from l4router.parsers import http1, http2, tls


class Peek:
    """An immutable snapshot of the first bytes; a new one is made when more bytes arrive.

    Parses are computed on first use and cached on the snapshot. A third-party detector caches
    its own parser with `peek.parsed(function)`.
    """

    __slots__ = ("data", "transport", "elicited", "datagrams", "__dict__")

    def __init__(self, data, transport="tcp", elicited=b"", datagrams=()):
        self.data = bytes(data)
        self.transport = transport
        self.elicited = elicited  # what the router sent the client to draw out more bytes
        # UDP: the client's first datagrams, boundaries kept (TCP: the bytes as one).
        self.datagrams = tuple(datagrams) or (self.data,)

    @classmethod
    def of_datagrams(cls, datagrams):
        return cls(b"".join(datagrams), transport="udp", datagrams=datagrams)

    def parsed(self, parser):
        """`parser(self.data)`, computed once per snapshot."""
        cache = self.__dict__.setdefault("_parsed", {})
        try:
            return cache[parser]
        except KeyError:
            result = cache[parser] = parser(self.data)
            return result

    @cached_property
    def tls_client_hello(self):
        return tls.parse_client_hello(self.data)

    @cached_property
    def http1_request(self):
        return http1.parse_request(self.data)

    @cached_property
    def h2_first_headers(self):
        return http2.parse_first_request(self.data)
