"""MQTT CONNECT (3.1, 3.1.1 and 5.0): protocol level, client id and user name."""

from __future__ import annotations

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid, Reader, Truncated

CONNECT = 0x10
PROTOCOL_NAMES = {(b"MQTT", 4): "3.1.1", (b"MQTT", 5): "5.0", (b"MQIsdp", 3): "3.1"}
MAX_PACKET = 65536


@attrs.frozen
class Connect:
    version: str
    client_id: str
    username: str | None


def _remaining_length(data: bytes) -> tuple[int, int] | Incomplete | Invalid:
    """(value, bytes used) of the variable-length integer at data[1:], or INCOMPLETE/Invalid."""
    value = 0
    for index in range(4):
        if len(data) <= 1 + index:
            return INCOMPLETE
        byte = data[1 + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    return Invalid("remaining length longer than 4 bytes")


def _varint(reader: Reader) -> int:
    value = 0
    for index in range(4):
        byte = reader.uint(1)
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value
    raise Truncated("variable integer longer than 4 bytes")


def parse_connect(data: bytes) -> Connect | Incomplete | Invalid:
    if data[:1] not in (b"", bytes([CONNECT])):
        return Invalid("not a CONNECT packet")
    if not data:
        return INCOMPLETE
    length = _remaining_length(data)
    if not isinstance(length, tuple):
        return length
    remaining, used = length
    if not 10 <= remaining <= MAX_PACKET:
        return Invalid("CONNECT length out of range")
    # The protocol name shows early: reject non-MQTT before the whole packet is in.
    prefix = data[1 + used : 1 + used + 8]
    if not any(
        (len(n).to_bytes(2, "big") + n)[: len(prefix)] == prefix[: len(n) + 2]
        for n, _ in PROTOCOL_NAMES
    ):
        return Invalid("not the MQTT protocol name")
    end = 1 + used + remaining
    if len(data) < end:
        return INCOMPLETE
    try:
        return _parse_body(Reader(data, 1 + used, end))
    except (Truncated, UnicodeDecodeError) as exc:
        return Invalid(f"malformed CONNECT: {exc}")


def _parse_body(reader: Reader) -> Connect:
    name = reader.vector(2)
    level = reader.uint(1)
    version = PROTOCOL_NAMES.get((name, level))
    if version is None:
        raise Truncated(f"unknown protocol {name!r} level {level}")
    flags = reader.uint(1)
    if flags & 0x01:
        raise Truncated("reserved flag set")
    reader.take(2)  # keep alive
    if level == 5:
        reader.take(_varint(reader))  # properties
    client_id = reader.vector(2).decode("utf-8")
    if flags & 0x04:  # will
        if level == 5:
            reader.take(_varint(reader))
        reader.vector(2)
        reader.vector(2)
    username = reader.vector(2).decode("utf-8") if flags & 0x80 else None
    return Connect(version, client_id, username)
