"""SOCKS client greetings: SOCKS5 (RFC 1928) method selection, SOCKS4 and SOCKS4a requests."""

from __future__ import annotations

import ipaddress

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

MAX_METHODS = 16
MAX_USERID = 255


@attrs.frozen
class Greeting:
    version: str  # "5", "4", "4a"
    methods: tuple[int, ...] = ()  # SOCKS5 authentication methods offered
    host: str | None = None  # SOCKS4/4a destination
    port: int | None = None


def _known_method(method: int) -> bool:
    return method <= 0x09 or 0x80 <= method <= 0xFE


def parse_greeting(data: bytes) -> Greeting | Incomplete | Invalid:
    if not data:
        return INCOMPLETE
    if data[0] == 5:
        return _socks5(data)
    if data[0] == 4:
        return _socks4(data)
    return Invalid("not SOCKS 4 or 5")


def _socks5(data: bytes) -> Greeting | Incomplete | Invalid:
    if len(data) < 2:
        return INCOMPLETE
    count = data[1]
    if not 1 <= count <= MAX_METHODS:
        return Invalid("method count out of range")
    methods = data[2 : 2 + count]
    if not all(_known_method(m) for m in methods):
        return Invalid("unknown authentication method")
    if len(methods) < count:
        return INCOMPLETE
    if len(data) > 2 + count:
        return Invalid("bytes after the greeting: a SOCKS5 client waits for the answer")
    return Greeting("5", tuple(methods))


def _socks4(data: bytes) -> Greeting | Incomplete | Invalid:
    if len(data) >= 2 and data[1] not in (1, 2):
        return Invalid("SOCKS4 command is neither CONNECT nor BIND")
    end_of_user = data.find(b"\x00", 8, 8 + MAX_USERID + 1)
    if end_of_user < 0:
        return INCOMPLETE if len(data) < 8 + MAX_USERID + 1 else Invalid("user id too long")
    port = int.from_bytes(data[2:4], "big")
    address = data[4:8]
    if address[:3] == b"\x00\x00\x00" and address[3] != 0:  # SOCKS4a: the name follows
        end_of_host = data.find(b"\x00", end_of_user + 1, end_of_user + 257)
        if end_of_host < 0:
            return INCOMPLETE if len(data) < end_of_user + 257 else Invalid("host too long")
        host = data[end_of_user + 1 : end_of_host].decode("ascii", "backslashreplace").lower()
        return Greeting("4a", host=host, port=port)
    return Greeting("4", host=str(ipaddress.IPv4Address(address)), port=port)
