"""Sans-IO parsers of first flights: pure functions of bytes, bounded, never raising.

Each parser returns a typed result, INCOMPLETE when the bytes so far are a valid prefix, or an
Invalid carrying the reason the bytes cannot be this protocol.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs


class Incomplete:
    """The type of INCOMPLETE: the bytes so far are a valid prefix (falsy)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "INCOMPLETE"

    def __bool__(self) -> bool:
        return False


INCOMPLETE = Incomplete()


@attrs.frozen
class Invalid:
    """The bytes cannot be this protocol; `reason` is for debugging and tests."""

    reason: str

    def __bool__(self) -> bool:
        return False


def first_header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header `name` in (name, value) pairs, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


class Truncated(Exception):
    """Raised inside a parser when a length field points past the end; never escapes one."""


class Reader:
    """A bounds-checked cursor over bytes that raises Truncated instead of IndexError."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > self.end:
            raise Truncated(f"needs {count} bytes at offset {self.pos}, has {self.remaining}")
        start = self.pos
        self.pos += count
        return self.data[start : self.pos]

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        """A length-prefixed byte string (TLS `opaque x<0..2^(8*length_size)-1>`)."""
        return self.take(self.uint(length_size))

    def sub(self, length_size: int) -> Reader:
        """A Reader over a length-prefixed block, advancing past it."""
        length = self.uint(length_size)
        if self.pos + length > self.end:
            raise Truncated(f"block of {length} bytes at offset {self.pos} overruns {self.end}")
        reader = Reader(self.data, self.pos, self.pos + length)
        self.pos += length
        return reader
