"""XMPP stream header (RFC 6120 4.2): the `to` domain and the namespace (client or server)."""

from __future__ import annotations

import re

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

MAX_HEADER = 4096
_DECLARATION = re.compile(rb"^\s*(<\?xml[^>]{0,200}\?>\s*)?")
_OPEN = b"<stream:stream"
_ATTRIBUTE = re.compile(rb"""([\w:.-]+)\s*=\s*(?:'([^']*)'|"([^"]*)")""")


@attrs.frozen
class StreamHeader:
    to: str | None
    namespace: str | None


def parse_stream_header(data: bytes) -> StreamHeader | Incomplete | Invalid:
    declaration = _DECLARATION.match(data)  # all of it optional: it always matches
    start = declaration.end() if declaration else 0
    rest = data[start:]
    if rest[: len(_OPEN)] != _OPEN[: len(rest)]:
        if rest == b"" or (
            data.lstrip()[:5] == b"<?xml"[: len(data.lstrip()[:5])] and b">" not in data
        ):
            return INCOMPLETE if len(data) < MAX_HEADER else Invalid("header too long")
        return Invalid("no <stream:stream")
    end = rest.find(b">")
    if end < 0:
        return INCOMPLETE if len(data) < MAX_HEADER else Invalid("header too long")
    attributes = {
        m.group(1): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _ATTRIBUTE.finditer(rest[len(_OPEN) : end])
    }
    to = attributes.get(b"to")
    namespace = attributes.get(b"xmlns")
    return StreamHeader(
        to.decode("utf-8", "replace").lower() if to else None,
        namespace.decode("utf-8", "replace") if namespace else None,
    )
