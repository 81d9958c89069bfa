"""STUN (RFC 8489) messages, as WebRTC and TURN clients send first: method, class, USERNAME."""

from __future__ import annotations

import attrs

from l4router.parsers import Invalid, Reader, Truncated

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
HEADER = 20
ATTRIBUTE_USERNAME = 0x0006
METHODS = {
    0x001: "binding",
    0x003: "allocate",
    0x004: "refresh",
    0x006: "send",
    0x007: "data",
    0x008: "create_permission",
    0x009: "channel_bind",
}
CLASSES = {0b00: "request", 0b01: "indication", 0b10: "success", 0b11: "error"}


@attrs.frozen
class Message:
    method: str
    kind: str
    username: str | None


def parse_message(datagram: bytes) -> Message | Invalid:
    if len(datagram) < HEADER or datagram[0] & 0xC0 or datagram[4:8] != MAGIC_COOKIE:
        return Invalid("not a STUN message")
    message_type = int.from_bytes(datagram[0:2], "big")
    length = int.from_bytes(datagram[2:4], "big")
    if length % 4 or HEADER + length != len(datagram):
        return Invalid("STUN length does not match the datagram")
    method = (
        (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    )
    kind = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    username = None
    reader = Reader(datagram, HEADER)
    try:
        while reader.remaining:
            attribute = reader.uint(2)
            value = reader.vector(2)
            reader.take(-len(value) % 4)  # padding to 4 bytes
            if attribute == ATTRIBUTE_USERNAME:
                username = value.decode("utf-8", "backslashreplace")
    except Truncated as exc:
        return Invalid(f"malformed STUN attributes: {exc}")
    return Message(METHODS.get(method, f"0x{method:03x}"), CLASSES[kind], username)
