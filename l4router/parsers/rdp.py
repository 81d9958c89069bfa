"""RDP's first PDU: a TPKT-framed X.224 Connection Request ([MS-RDPBCGR] 2.2.1.1) with the
optional `Cookie: mstshash=` user name and the requested security protocols."""

from __future__ import annotations

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

COOKIE = b"Cookie: mstshash="
NEGOTIATION_REQUEST = 0x01
PROTOCOLS = {0x1: "ssl", 0x2: "hybrid", 0x8: "hybrid_ex", 0x10: "rdstls"}


@attrs.frozen
class ConnectionRequest:
    cookie: str | None
    protocols: tuple[str, ...]  # requested security protocols by name; () for standard RDP security


def parse_connection_request(data: bytes) -> ConnectionRequest | Incomplete | Invalid:
    head = data[:2]
    if head != b"\x03\x00"[: len(head)]:
        return Invalid("not TPKT version 3")
    if len(data) < 11:
        return _early_checks(data)
    length = int.from_bytes(data[2:4], "big")
    if not 11 <= length <= 1024 or data[4] != length - 5 or data[5] != 0xE0:
        return Invalid("not an X.224 Connection Request")
    if len(data) < length:
        return INCOMPLETE
    body = data[11:length]
    cookie = None
    if body.startswith(COOKIE):
        end = body.find(b"\r\n")
        if end < 0:
            return Invalid("cookie without CR LF")
        cookie = body[len(COOKIE) : end].decode("ascii", "backslashreplace")
        body = body[end + 2 :]
    elif body.startswith(b"Cookie: msts="):  # a load-balancer routing token
        end = body.find(b"\r\n")
        body = body[end + 2 :] if end >= 0 else b""
    protocols: tuple[str, ...] = ()
    if len(body) >= 8 and body[0] == NEGOTIATION_REQUEST:
        requested = int.from_bytes(body[4:8], "little")
        protocols = tuple(name for bit, name in PROTOCOLS.items() if requested & bit)
    return ConnectionRequest(cookie, protocols)


def _early_checks(data: bytes) -> Incomplete | Invalid:
    if len(data) >= 4 and not 11 <= int.from_bytes(data[2:4], "big") <= 1024:
        return Invalid("TPKT length out of range")
    if len(data) >= 6 and data[5] != 0xE0:
        return Invalid("not an X.224 Connection Request")
    return INCOMPLETE
