"""DTLS ClientHello (RFC 6347 / 9147): records in datagrams, the handshake possibly in
fragments, the body like TLS's plus the cookie."""

from __future__ import annotations

from collections.abc import Sequence

from l4router.parsers import INCOMPLETE, Incomplete, Invalid, Reader, Truncated
from l4router.parsers.tls import MAX_CLIENT_HELLO, ClientHello, _parse_body

RECORD_HANDSHAKE = 22
RECORD_HEADER = 13
HANDSHAKE_HEADER = 12


def parse_client_hello(datagrams: Sequence[bytes]) -> ClientHello | Incomplete | Invalid:
    """The first ClientHello in a client's first datagrams -> ClientHello | INCOMPLETE | Invalid."""
    if not datagrams:
        return INCOMPLETE
    fragments: dict[int, bytes] = {}
    total: int | None = None
    try:
        for index, datagram in enumerate(datagrams):
            reader = Reader(datagram)
            while reader.remaining:
                content_type = reader.uint(1)
                version = reader.uint(2)
                if content_type != RECORD_HANDSHAKE or version >> 8 != 0xFE:
                    if index == 0 and reader.pos == 3:
                        return Invalid("not a DTLS handshake record")
                    break
                reader.take(8)  # epoch and sequence number
                record = reader.sub(2)
                kind = record.uint(1)
                length = record.uint(3)
                if kind != 1 or length > MAX_CLIENT_HELLO:
                    return Invalid("not a ClientHello")
                record.take(2)  # message_seq
                fragment_offset = record.uint(3)
                fragment = record.vector(3)
                if fragment_offset + len(fragment) > length:
                    return Invalid("fragment beyond the message")
                total = length
                fragments[fragment_offset] = fragment
    except Truncated as exc:
        return Invalid(f"malformed DTLS record: {exc}")
    body = bytearray()
    for start in sorted(fragments):
        if start > len(body):
            break
        body.extend(fragments[start][len(body) - start :])
    if total is None or len(body) < total:
        return INCOMPLETE
    try:
        return _parse_body(Reader(bytes(body[:total])), dtls=True)
    except Truncated as exc:
        return Invalid(f"malformed ClientHello: {exc}")
