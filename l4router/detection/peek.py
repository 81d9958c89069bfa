"""The bytes a client sent so far, with parses cached so ten detectors parse them once."""

from functools import cached_property

from l4router.parsers import http1, tls


class Peek:
    """An immutable snapshot of the first bytes; a new one is made when more bytes arrive.

    Parses are computed on first use and cached on the snapshot. A third-party detector caches
    its own parser with `peek.parsed(function)`.
    """

    __slots__ = ("data", "transport", "__dict__")

    def __init__(self, data, transport="tcp"):
        self.data = bytes(data)
        self.transport = transport

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
