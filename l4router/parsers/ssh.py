"""SSH identification string (RFC 4253 4.2): `SSH-protoversion-softwareversion SP comments CRLF`."""

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

PREFIX = b"SSH-"
MAX_LINE = 255  # RFC 4253: at most 255 characters, CR LF included


@attrs.frozen
class Identification:
    version: str
    software: str
    comments: str
    banner: str


def parse_identification(data: bytes) -> Identification | Incomplete | Invalid:
    head = data[: len(PREFIX)]
    if head != PREFIX[: len(head)]:
        return Invalid("no SSH- prefix")
    end = data.find(b"\n", 0, MAX_LINE)
    if end < 0:
        return INCOMPLETE if len(data) < MAX_LINE else Invalid("identification line too long")
    line = data[:end].rstrip(b"\r")
    if any(byte < 0x20 or byte > 0x7E for byte in line):
        return Invalid("control or non-ASCII character in the identification line")
    text = line.decode("ascii")
    ident, _, comments = text.partition(" ")
    parts = ident.split("-", 2)
    if len(parts) != 3 or parts[1] not in ("2.0", "1.99", "1.5") or not parts[2]:
        return Invalid("malformed SSH identification")
    return Identification(parts[1], parts[2], comments, text)
