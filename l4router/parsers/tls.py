"""TLS ClientHello parser (RFC 8446 / 5246), reassembling the handshake across records.

A ClientHello may be split over several TLS records and arrive in many TCP segments; the parser
is run on the bytes so far and answers INCOMPLETE until the whole handshake message is there.
"""

from __future__ import annotations

from typing import Any

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid, Reader, Truncated

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
RECORD_HEADER = 5
MAX_RECORD = 2**14 + 2048  # RFC 8446 5.2 allows TLSCiphertext up to 2^14 + 256; be lenient
MAX_CLIENT_HELLO = 2**16 + 2**14  # bigger than any real one, post-quantum key shares included
# Clients send a ClientHello in one record (in two when it exceeds 16 KiB). Many tiny records
# only make a parser that is re-run per segment walk them again and again: not TLS we route.
MAX_RECORDS = 8

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D

VERSION_NAMES = {
    0x0300: "ssl3",
    0x0301: "1.0",
    0x0302: "1.1",
    0x0303: "1.2",
    0x0304: "1.3",
    0xFEFF: "dtls1.0",
    0xFEFD: "dtls1.2",
    0xFEFC: "dtls1.3",
}


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values (0x0A0A, 0x1A1A, ...) are noise a client adds on purpose."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@attrs.frozen
class ClientHello:
    legacy_version: int
    sni: str | None
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]  # offered versions, GREASE removed, client's order
    ech: bool
    extensions: tuple[int, ...]  # extension type numbers in order, GREASE removed

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version offered: supported_versions when sent, else the legacy one."""
        return self.supported_versions or (self.legacy_version,)

    @property
    def version(self) -> str:
        """The highest version offered, by name ('1.3')."""
        return version_name(max(self.versions))


def version_name(number: int) -> str:
    return VERSION_NAMES.get(number, f"0x{number:04x}")


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "backslashreplace")


def parse_client_hello(data: bytes) -> ClientHello | Incomplete | Invalid:
    """The ClientHello from the first bytes of a TLS connection -> ClientHello | INCOMPLETE |
    Invalid."""
    handshake = _reassemble(data)
    if not isinstance(handshake, bytes):
        return handshake
    try:
        return _parse_body(Reader(handshake))
    except Truncated as exc:
        return Invalid(f"malformed ClientHello: {exc}")


def parse_client_hello_message(data: bytes) -> ClientHello | Incomplete | Invalid:
    """A ClientHello handshake message without the record layer (QUIC carries it in CRYPTO
    frames) -> ClientHello | INCOMPLETE | Invalid."""
    if data[:1] not in (b"", bytes([HANDSHAKE_CLIENT_HELLO])):
        return Invalid(f"handshake type {data[0]} is not ClientHello")
    if len(data) < 4:
        return INCOMPLETE
    length = int.from_bytes(data[1:4], "big")
    if length > MAX_CLIENT_HELLO:
        return Invalid(f"ClientHello length {length} out of range")
    if len(data) < 4 + length:
        return INCOMPLETE
    try:
        return _parse_body(Reader(data[4 : 4 + length]))
    except Truncated as exc:
        return Invalid(f"malformed ClientHello: {exc}")


def client_hello_bytes_needed(data: bytes) -> int:
    """For a flight parse_client_hello calls INCOMPLETE: the length it must reach before the
    answer can change. In the first record that is the end of the record or of the
    ClientHello, whichever comes first; past it (a ClientHello spread over records, rare),
    one byte more."""
    more = len(data) + 1
    if len(data) < RECORD_HEADER + 4:
        return more
    record_end = RECORD_HEADER + int.from_bytes(data[3:5], "big")
    hello_end = RECORD_HEADER + 4 + int.from_bytes(data[6:9], "big")
    return max(more, min(record_end, hello_end)) if len(data) < record_end else more


def _reassemble(data: bytes) -> bytes | Incomplete | Invalid:
    """The whole ClientHello handshake body (after its 4-byte header) gathered from records."""
    fragments: list[bytes] = []
    gathered = 0
    needed: int | None = None
    pos = 0
    size = len(data)
    while True:
        if len(fragments) == MAX_RECORDS:
            return Invalid(f"ClientHello spread over more than {MAX_RECORDS} records")
        if size - pos < RECORD_HEADER:
            return _check_partial_header(data[pos:])
        if data[pos] != RECORD_HANDSHAKE:
            return Invalid(f"record type {data[pos]} is not handshake")
        if data[pos + 1] != 3 or data[pos + 2] > 4:
            return Invalid(f"record version {data[pos + 1]}.{data[pos + 2]} is not TLS")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > MAX_RECORD:
            return Invalid(f"record length {length} out of range")
        fragment = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        fragments.append(fragment)
        gathered += len(fragment)
        if needed is None and gathered >= 4:
            head = b"".join(fragments)[:4]
            if head[0] != HANDSHAKE_CLIENT_HELLO:
                return Invalid(f"handshake type {head[0]} is not ClientHello")
            needed = 4 + int.from_bytes(head[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                return Invalid(f"ClientHello length {needed - 4} out of range")
        if needed is not None and gathered >= needed:
            return b"".join(fragments)[4:needed]
        if len(fragment) < length:
            return INCOMPLETE
        pos += RECORD_HEADER + length


def _check_partial_header(head: bytes) -> Incomplete | Invalid:
    if head and head[0] != RECORD_HANDSHAKE:
        return Invalid(f"record type {head[0]} is not handshake")
    if len(head) > 1 and head[1] != 3:
        return Invalid(f"record version {head[1]} is not TLS")
    if len(head) > 2 and head[2] > 4:
        return Invalid(f"record version 3.{head[2]} is not TLS")
    return INCOMPLETE


def _parse_body(
    reader: Reader, dtls: bool = False, partial: dict[str, Any] | None = None
) -> ClientHello:
    legacy_version = reader.uint(2)
    if legacy_version >> 8 != (0xFE if dtls else 3):
        raise Truncated(f"client version 0x{legacy_version:04x} is not {'DTLS' if dtls else 'TLS'}")
    reader.take(32)  # random
    if len(reader.vector(1)) > 32:
        raise Truncated("session id longer than 32 bytes")
    if dtls:
        reader.vector(1)  # the HelloVerifyRequest cookie
    suites = reader.vector(2)
    if not suites or len(suites) % 2:
        raise Truncated("cipher suites list empty or odd")
    if not reader.vector(1):
        raise Truncated("no compression methods")
    found: dict[str, Any] = {
        "legacy_version": legacy_version,
        "sni": None,
        "alpn": (),
        "supported_versions": (),
        "ech": False,
        "extensions": (),
    }
    if partial is not None:
        partial.update(found)
        found = partial  # what is parsed so far stays there when the bytes run out
    if reader.remaining:
        extensions = reader.sub(2) if partial is None else _rest_of_block(reader)
        _read_extensions(extensions, found)
    return ClientHello(**found)


def _read_extensions(extensions: Reader, found: dict[str, Any]) -> None:
    """Each extension's type into found["extensions"] (so far, if the bytes run out), and
    what the ones routing asks about say. Walked by offset: a Reader is made only for the
    few extensions that are read (a ClientHello has a dozen or more)."""
    data, pos, end = extensions.data, extensions.pos, extensions.end
    types: list[int] = []
    try:
        while pos < end:
            if end - pos < 4:
                raise Truncated(f"extension header at offset {pos} overruns {end}")
            kind = int.from_bytes(data[pos : pos + 2], "big")
            start = pos + 4
            pos = start + int.from_bytes(data[pos + 2 : start], "big")
            if pos > end:
                raise Truncated(f"extension at offset {start} overruns {end}")
            if is_grease(kind):
                continue
            types.append(kind)
            if kind == EXT_SERVER_NAME:
                found["sni"] = _server_name(Reader(data, start, pos))
            elif kind == EXT_ALPN:
                found["alpn"] = _alpn(Reader(data, start, pos))
            elif kind == EXT_SUPPORTED_VERSIONS:
                found["supported_versions"] = _supported_versions(Reader(data, start, pos))
            elif kind == EXT_ENCRYPTED_CLIENT_HELLO:
                found["ech"] = True
    finally:
        found["extensions"] = tuple(types)


def _rest_of_block(reader: Reader) -> Reader:
    """The extensions block of a ClientHello cut short: what of it is there."""
    length = reader.uint(2)
    end = min(reader.end, reader.pos + length)
    block = Reader(reader.data, reader.pos, end)
    reader.pos = end
    return block


def parse_truncated_client_hello(data: bytes) -> ClientHello | None:
    """What a ClientHello cut short (by `detect.max_bytes`, or the client closing) says so far:
    a ClientHello with the fields parsed before the cut, once the bytes prove one (a handshake
    record whose message is a ClientHello); None when they do not."""
    handshake = _gathered(data)
    if len(handshake) < 6 or handshake[0] != HANDSHAKE_CLIENT_HELLO or handshake[4] != 3:
        return None
    partial: dict[str, Any] = {}
    try:
        return _parse_body(Reader(handshake[4:]), partial=partial)
    except Truncated:
        if not partial:  # cut before the extensions: a ClientHello all the same
            partial = {
                "legacy_version": int.from_bytes(handshake[4:6], "big"),
                "sni": None,
                "alpn": (),
                "supported_versions": (),
                "ech": False,
                "extensions": (),
            }
        return ClientHello(**partial)


def _gathered(data: bytes) -> bytes:
    """The handshake bytes of the records so far, the last one possibly cut."""
    fragments: list[bytes] = []
    pos = 0
    while len(data) - pos >= RECORD_HEADER and len(fragments) < MAX_RECORDS:
        if data[pos] != RECORD_HANDSHAKE or data[pos + 1] != 3 or data[pos + 2] > 4:
            break
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        fragments.append(data[pos + RECORD_HEADER : pos + RECORD_HEADER + length])
        pos += RECORD_HEADER + length
    return b"".join(fragments)


def _server_name(body: Reader) -> str | None:
    names = body.sub(2)
    while names.remaining:
        kind = names.uint(1)
        name = names.vector(2)
        if kind == 0 and name:
            return _text(name).rstrip(".").lower()
    return None


def _alpn(body: Reader) -> tuple[str, ...]:
    protocols = body.sub(2)
    offered: list[str] = []
    while protocols.remaining:
        name = protocols.vector(1)
        if not name:
            raise Truncated("empty ALPN protocol name")
        offered.append(_text(name))
    return tuple(offered)


def _supported_versions(body: Reader) -> tuple[int, ...]:
    versions = body.sub(1)
    offered: list[int] = []
    while versions.remaining:
        version = versions.uint(2)
        if not is_grease(version):
            offered.append(version)
    return tuple(offered)
