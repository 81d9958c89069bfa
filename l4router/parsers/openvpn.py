"""OpenVPN over TCP: the client's first packet, P_CONTROL_HARD_RESET_CLIENT_V2 or _V3, behind
the 2-byte packet length of the TCP framing."""

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

HARD_RESET_CLIENT = {7: "v2", 10: "v3"}
MIN_LENGTH = 14  # opcode, session id, ack array length, packet id
MAX_LENGTH = 1600


@attrs.frozen
class HardReset:
    kind: str  # v2 or v3 (tls-crypt-v2)


def parse_hard_reset(data: bytes) -> HardReset | Incomplete | Invalid:
    if len(data) >= 2:
        length = int.from_bytes(data[:2], "big")
        if not MIN_LENGTH <= length <= MAX_LENGTH:
            return Invalid("packet length out of range")
    elif data[:1] and data[0] > MAX_LENGTH >> 8:
        return Invalid("packet length out of range")
    if len(data) < 3:
        return INCOMPLETE
    opcode, key_id = data[2] >> 3, data[2] & 0x07
    if opcode not in HARD_RESET_CLIENT or key_id != 0:
        return Invalid("not a client hard reset")
    if len(data) < 2 + length:
        return INCOMPLETE
    return HardReset(HARD_RESET_CLIENT[opcode])


def parse_udp_hard_reset(datagram: bytes) -> HardReset | Incomplete | Invalid:
    """Over UDP there is no length prefix: the datagram starts with the opcode."""
    if not MIN_LENGTH <= len(datagram) <= MAX_LENGTH:
        return Invalid("datagram size out of range")
    return parse_hard_reset(len(datagram).to_bytes(2, "big") + datagram)
