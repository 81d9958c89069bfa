"""WireGuard: the handshake initiation message (type 1, exactly 148 bytes)."""

import attrs

from l4router.parsers import Invalid

INITIATION = 1
INITIATION_SIZE = 148


@attrs.frozen
class Initiation:
    sender_index: int


def parse_initiation(datagram: bytes) -> Initiation | Invalid:
    if len(datagram) != INITIATION_SIZE or datagram[:4] != bytes([INITIATION, 0, 0, 0]):
        return Invalid("not a WireGuard handshake initiation")
    return Initiation(int.from_bytes(datagram[4:8], "little"))
