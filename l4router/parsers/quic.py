"""QUIC client Initial packets (RFC 9000/9001 v1, RFC 9369 v2): derive the Initial keys from
the Destination Connection ID, remove header protection, decrypt, reassemble the CRYPTO
frames (out of order, across packets and datagrams) and parse the ClientHello inside.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid, Reader, Truncated
from l4router.parsers.tls import ClientHello, parse_client_hello_message

VERSION_1 = 0x00000001
VERSION_2 = 0x6B3343CF
VERSION_NAMES = {VERSION_1: "1", VERSION_2: "2"}
INITIAL_SALTS = {
    VERSION_1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    VERSION_2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
LABEL_PREFIXES = {VERSION_1: b"quic ", VERSION_2: b"quicv2 "}
INITIAL_TYPES = {VERSION_1: 0b00, VERSION_2: 0b01}  # the long-header packet type of Initial
MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 14.1: clients pad datagrams with Initial packets
MAX_CRYPTO = 65536  # beyond any real ClientHello
FRAME_PADDING, FRAME_PING, FRAME_ACK, FRAME_ACK_ECN, FRAME_CRYPTO = 0x00, 0x01, 0x02, 0x03, 0x06
FRAME_CONNECTION_CLOSE = 0x1C


@attrs.frozen
class InitialKeys:
    key: bytes
    iv: bytes
    hp: bytes


@attrs.frozen
class QuicHello:
    version: str
    hello: ClientHello


def hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    from cryptography.hazmat.primitives import hashes  # imported late: see _decrypt
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def client_initial_keys(version: int, dcid: bytes) -> InitialKeys:
    """RFC 9001 5.2 (and RFC 9369 3.3.1 for v2): the keys protecting client Initials."""
    initial_secret = hmac.new(INITIAL_SALTS[version], dcid, hashlib.sha256).digest()
    client_secret = hkdf_expand_label(initial_secret, b"client in", 32)
    prefix = LABEL_PREFIXES[version]
    return InitialKeys(
        hkdf_expand_label(client_secret, prefix + b"key", 16),
        hkdf_expand_label(client_secret, prefix + b"iv", 12),
        hkdf_expand_label(client_secret, prefix + b"hp", 16),
    )


def varint(reader: Reader) -> int:
    first = reader.uint(1)
    length = 1 << (first >> 6)
    value = first & 0x3F
    for byte in reader.take(length - 1):
        value = value << 8 | byte
    return value


@attrs.frozen
class InitialPacket:
    version: int
    dcid: bytes
    packet_number: int
    payload: bytes  # decrypted frames
    size: int  # bytes of the datagram this packet used


def decrypt_initial(datagram: bytes, offset: int = 0) -> InitialPacket | Invalid:
    """The client Initial packet at `offset` -> InitialPacket, or Invalid."""
    try:
        return _decrypt(datagram, offset)
    except Truncated as exc:
        return Invalid(f"truncated packet: {exc}")


def _decrypt(datagram: bytes, offset: int) -> InitialPacket | Invalid:
    reader = Reader(datagram, offset)
    first = reader.uint(1)
    if first & 0xC0 != 0xC0:
        return Invalid("not a long-header packet with the fixed bit")
    version = reader.uint(4)
    if version not in INITIAL_SALTS:
        return Invalid(f"QUIC version 0x{version:08x} not v1 or v2")
    if (first >> 4) & 0b11 != INITIAL_TYPES[version]:
        return Invalid("not an Initial packet")
    dcid = reader.vector(1)
    if len(dcid) > 20 or len(reader.vector(1)) > 20:
        return Invalid("connection id longer than 20 bytes")
    reader.take(varint(reader))  # token
    length = varint(reader)
    pn_offset = reader.pos
    if length < 20 or pn_offset + length > len(datagram):
        return Invalid("packet length out of range")
    # cryptography's OpenSSL bindings cost a process ~7 MiB: imported at the first datagram
    # that looks like a QUIC Initial, not at start-up (a worker may never see one).
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    keys = client_initial_keys(version, dcid)
    sample = datagram[pn_offset + 4 : pn_offset + 20]
    encryptor = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    first ^= mask[0] & 0x0F
    pn_length = (first & 0x03) + 1
    packet_number_bytes = bytes(
        b ^ m for b, m in zip(datagram[pn_offset : pn_offset + pn_length], mask[1 : 1 + pn_length])
    )
    header = bytes([first]) + datagram[offset + 1 : pn_offset] + packet_number_bytes
    packet_number = int.from_bytes(packet_number_bytes, "big")
    nonce = (int.from_bytes(keys.iv, "big") ^ packet_number).to_bytes(12, "big")
    end = pn_offset + length
    try:
        payload = AESGCM(keys.key).decrypt(nonce, datagram[pn_offset + pn_length : end], header)
    except InvalidTag:
        return Invalid("Initial packet does not decrypt")
    return InitialPacket(version, dcid, packet_number, payload, end - offset)


def crypto_frames(payload: bytes) -> list[tuple[int, bytes]]:
    """(offset, data) of every CRYPTO frame in a decrypted Initial payload."""
    reader = Reader(payload)
    found: list[tuple[int, bytes]] = []
    while reader.remaining:
        kind = varint(reader)
        if kind == FRAME_PADDING or kind == FRAME_PING:
            continue
        if kind == FRAME_CRYPTO:
            offset = varint(reader)
            data = reader.take(varint(reader))
            if offset + len(data) > MAX_CRYPTO:
                raise Truncated("CRYPTO data beyond any ClientHello")
            found.append((offset, data))
        elif kind in (FRAME_ACK, FRAME_ACK_ECN):
            varint(reader), varint(reader)  # largest acknowledged, delay
            ranges = varint(reader)
            varint(reader)  # first range
            for _ in range(ranges * 2):
                varint(reader)
            if kind == FRAME_ACK_ECN:
                varint(reader), varint(reader), varint(reader)
        elif kind == FRAME_CONNECTION_CLOSE:
            varint(reader), varint(reader)
            reader.take(varint(reader))
        else:
            raise Truncated(f"frame type {kind} cannot be in a client Initial")
    return found


def parse_client_initials(datagrams: Sequence[bytes]) -> QuicHello | Incomplete | Invalid:
    """The ClientHello carried by a client's first datagrams -> QuicHello | INCOMPLETE | Invalid.

    Every Initial packet (coalesced ones too) of the first connection id is decrypted and
    its CRYPTO frames placed by offset; the ClientHello is parsed once its bytes from offset
    0 are contiguous.
    """
    if not datagrams:
        return INCOMPLETE
    pieces: dict[int, bytes] = {}
    version = 0
    dcid: bytes | None = None
    for index, datagram in enumerate(datagrams):
        offset = 0
        while offset < len(datagram):
            packet = decrypt_initial(datagram, offset)
            if not isinstance(packet, InitialPacket):
                if index == 0 and offset == 0:
                    return packet
                break  # a coalesced 0-RTT packet or padding: nothing more to learn here
            if dcid is None:
                version, dcid = packet.version, packet.dcid
            elif packet.dcid != dcid:
                break
            try:
                for start, data in crypto_frames(packet.payload):
                    pieces[start] = data
            except Truncated as exc:
                return Invalid(f"malformed Initial payload: {exc}")
            offset += packet.size
    stream = _contiguous(pieces)
    hello = parse_client_hello_message(stream)
    if hello is INCOMPLETE or not isinstance(hello, ClientHello):
        return hello
    return QuicHello(VERSION_NAMES[version], hello)


def _contiguous(pieces: dict[int, bytes]) -> bytes:
    stream = bytearray()
    for start in sorted(pieces):
        data = pieces[start]
        if start > len(stream):
            break
        stream.extend(data[len(stream) - start :])
    return bytes(stream)
