"""What a health check says to a server and what it must hear back.

A probe is the bytes sent once connected and a judge of the bytes received so far: pass,
fail (with why), or wait for more. `tcp` (the default) has no probe: a completed connect is
the check. The others speak the protocols l4router routes: a server that accepts connections
but no longer answers its protocol (a hung worker behind a listening socket, a port taken by
something else) is then marked down, which a connect alone cannot see.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from typing import Callable

import attrs

PROBES = ("tcp", "tls", "http", "ssh", "redis", "postgres", "content")
MAX_ANSWER = 4096  # what a judge reads at most; an answer must be decided by then


@attrs.frozen
class Probe:
    name: str
    greeting: bytes  # sent once connected (may be empty: the server speaks first)
    # The answer so far -> None while more bytes could change it, else (passed, why).
    judge: Callable[[bytes], tuple[bool, str] | None]


def probe_for(settings, host: str) -> Probe | None:
    """The probe a backend's `health_check` settings ask for, for a server named `host`;
    None for a plain TCP connect."""
    kind = settings.probe
    if kind == "tls":
        return Probe("tls", client_hello(settings.sni or _name_or_none(host)), _server_hello)
    if kind == "http":
        request = (
            f"GET {settings.path} HTTP/1.1\r\nHost: {settings.host or host}\r\n"
            "User-Agent: l4router-health-check\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        return Probe("http", request, _status_in(settings.expect_status))
    if kind == "ssh":
        # Both sides send their version line at once (RFC 4253 4.2): so do we.
        return Probe("ssh", b"SSH-2.0-l4router_health_check\r\n", _ssh_banner)
    if kind == "redis":
        return Probe("redis", b"*1\r\n$4\r\nPING\r\n", _pong)
    if kind == "postgres":
        return Probe("postgres", struct.pack("!II", 8, 80877103), _ssl_answer)
    if kind == "content":
        return Probe("content", settings.send, _matches(re.compile(settings.expect.encode())))
    return None


def _name_or_none(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return None  # SNI carries names only (RFC 6066)
    except ValueError:
        return host


def _server_hello(answer: bytes):
    if len(answer) < 6:
        return None
    if answer[0] == 0x15:
        return False, "a TLS alert instead of a ServerHello"
    if answer[0] != 0x16 or answer[1] != 0x03 or answer[5] != 0x02:
        return False, f"not a TLS ServerHello: {answer[:8].hex()}"
    return True, "ServerHello"


def _status_in(classes: tuple[str, ...]):
    """`classes`: "2xx" or an exact "204"."""

    def judge(answer: bytes):
        end = answer.find(b"\r\n")
        if end < 0:
            return None if len(answer) < MAX_ANSWER else (False, "no HTTP status line")
        match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: .*)?", answer[:end])
        if match is None:
            return False, f"not an HTTP status line: {answer[:end][:60]!r}"
        status = match.group(1).decode()
        if any(status == c or (c.endswith("xx") and status[0] == c[0]) for c in classes):
            return True, f"HTTP {status}"
        return False, f"HTTP {status}, expected {' or '.join(classes)}"

    return judge


def _ssh_banner(answer: bytes):
    end = answer.find(b"\n")
    if end < 0:
        return None if len(answer) < 255 else (False, "no SSH banner line")
    line = answer[:end].rstrip(b"\r")
    if line.startswith((b"SSH-2.0-", b"SSH-1.99-")):
        return True, line[:64].decode("ascii", "replace")
    return False, f"not an SSH banner: {line[:40]!r}"


def _pong(answer: bytes):
    if b"\r\n" not in answer:
        return None if len(answer) < MAX_ANSWER else (False, "no Redis reply")
    line = answer.split(b"\r\n", 1)[0]
    if line == b"+PONG":
        return True, "PONG"
    return False, f"not PONG: {line[:40]!r}"


def _ssl_answer(answer: bytes):
    if answer[:1] in (b"S", b"N"):
        return True, f"SSLRequest answered {answer[:1].decode()}"
    return False, f"not a PostgreSQL answer to SSLRequest: {answer[:8]!r}"


def _matches(expression: re.Pattern):
    def judge(answer: bytes):
        if expression.search(answer):
            return True, "expected answer"
        if len(answer) >= MAX_ANSWER:
            return False, "the expected answer is not in the first 4 KiB"
        return None

    return judge


# A ClientHello that TLS 1.2 and 1.3 servers (OpenSSL, Go, rustls) answer with a ServerHello.
_CIPHER_SUITES = (
    0x1301,
    0x1302,
    0x1303,
    0xC02B,
    0xC02F,
    0xC02C,
    0xC030,
    0xCCA9,
    0xCCA8,
    0xC013,
    0xC014,
    0x009C,
    0x009D,
    0x002F,
    0x0035,
)
_GROUPS = (0x001D, 0x0017, 0x0018)  # x25519, secp256r1, secp384r1
_SIGNATURES = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601, 0x0201)


def client_hello(server_name: str | None = None) -> bytes:
    """One TLS record holding a ClientHello (TLS 1.3 and 1.2), with `server_name` as SNI."""
    extensions = b""
    if server_name:
        name = server_name.encode("idna")
        entry = b"\x00" + struct.pack("!H", len(name)) + name
        extensions += _extension(0, struct.pack("!H", len(entry)) + entry)
    extensions += _extension(10, _list16(_GROUPS))
    extensions += _extension(11, b"\x01\x00")
    extensions += _extension(13, _list16(_SIGNATURES))
    extensions += _extension(43, b"\x04\x03\x04\x03\x03")  # TLS 1.3, TLS 1.2
    extensions += _extension(45, b"\x01\x01")  # psk_dhe_ke
    # An x25519 share: any 32 bytes are a public key; the handshake ends at the ServerHello.
    share = struct.pack("!HH", 0x001D, 32) + os.urandom(32)
    extensions += _extension(51, struct.pack("!H", len(share)) + share)
    extensions += _extension(0xFF01, b"\x00")
    session_id = os.urandom(32)
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + bytes([len(session_id)])
        + session_id
        + _list16(_CIPHER_SUITES)
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data


def _list16(values: tuple[int, ...]) -> bytes:
    return struct.pack("!H", 2 * len(values)) + struct.pack(f"!{len(values)}H", *values)
