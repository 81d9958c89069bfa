"""PROXY protocol v1 (text) and v2 (binary) headers, fed incrementally as bytes arrive.

A load balancer in front puts the real client address in front of the stream; the header is
parsed, removed, and the addresses it carries replace the TCP peer's.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CR LF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16
V2_MAX_BODY = 4096


@attrs.frozen
class ProxyHeader:
    version: int
    source: str | None  # None for LOCAL / UNKNOWN: the connection is the balancer's own
    source_port: int | None
    destination: str | None
    destination_port: int | None
    length: int  # bytes of header to remove from the stream
    fields: dict[str, Any] = attrs.field(factory=dict)  # v2 TLVs as route fields: pp_authority, ...


def starts_with_header(data: bytes | bytearray) -> bool:
    """The bytes begin with a whole v1 or v2 signature."""
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def parse_header(data: bytes) -> ProxyHeader | Incomplete | Invalid:
    if data[:1] == b"P" or (data and not data.startswith(V2_SIGNATURE[: len(data)])):
        return _v1(data)
    if len(data) < V2_HEADER:
        return INCOMPLETE
    return _v2(data)


def _v1(data: bytes) -> ProxyHeader | Incomplete | Invalid:
    if data[: len(V1_PREFIX)] != V1_PREFIX[: len(data)]:
        return Invalid("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        return INCOMPLETE if len(data) < V1_MAX else Invalid("v1 line too long")
    parts = data[len(V1_PREFIX) : end].split(b" ")
    if parts == [b"UNKNOWN"] or parts[:1] == [b"UNKNOWN"]:
        return ProxyHeader(1, None, None, None, None, end + 2)
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        return Invalid("v1 needs TCP4|TCP6 source destination ports")
    try:
        version = 4 if parts[0] == b"TCP4" else 6
        source, destination = (ipaddress.ip_address(p.decode("ascii")) for p in parts[1:3])
        ports = [int(p) for p in parts[3:5]]
    except (ValueError, UnicodeDecodeError):
        return Invalid("v1 address or port malformed")
    if (
        source.version != version
        or destination.version != version
        or not all(0 <= p <= 65535 and str(p).encode() == raw for p, raw in zip(ports, parts[3:]))
    ):
        return Invalid("v1 address family or port out of range")
    return ProxyHeader(1, str(source), ports[0], str(destination), ports[1], end + 2)


def _v2(data: bytes) -> ProxyHeader | Incomplete | Invalid:
    if data[:12] != V2_SIGNATURE:
        return Invalid("bad v2 signature")
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2 or command > 1:
        return Invalid("v2 version or command unknown")
    family = data[13]
    length = int.from_bytes(data[14:16], "big")
    if length > V2_MAX_BODY:
        return Invalid("v2 header too long")
    total = V2_HEADER + length
    if len(data) < total:
        return INCOMPLETE
    body = data[V2_HEADER:total]
    if command == 0:  # LOCAL: health checks of the balancer itself
        return ProxyHeader(2, None, None, None, None, total)
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source, destination = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        ports, tlvs = (body[8:10], body[10:12]), body[12:]
    elif family == 0x21 and length >= 36:  # TCP over IPv6
        source, destination = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        ports, tlvs = (body[32:34], body[34:36]), body[36:]
    elif family == 0x00:  # UNSPEC
        return ProxyHeader(2, None, None, None, None, total)
    else:
        return Invalid(f"v2 address family 0x{family:02x} not supported")
    fields = tlv_fields(tlvs)
    if isinstance(fields, Invalid):
        return fields
    return ProxyHeader(
        2,
        str(source),
        int.from_bytes(ports[0], "big"),
        str(destination),
        int.from_bytes(ports[1], "big"),
        total,
        fields,
    )


# TLVs received (PROXY protocol 2.2.x): the ones that become route fields.
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_TYPE_AWS = 0xEA
PP2_SUBTYPE_AWS_VPCE_ID = 0x01
PP2_CLIENT_SSL = 0x01
MAX_TLVS = 16  # more is not a balancer's header
FIELD_OF_TLV = {0x01: "pp_alpn", 0x02: "pp_authority", 0x05: "pp_unique_id"}
PP_FIELDS = (
    "pp_alpn",
    "pp_authority",
    "pp_unique_id",
    "pp_aws_vpce_id",
    "pp_ssl",
    "pp_ssl_version",
    "pp_ssl_cn",
)


def tlv_fields(data: bytes) -> dict[str, Any] | Invalid:
    """The route fields of a v2 header's TLVs, or Invalid when they do not add up. Values are
    text (printable ASCII kept, anything else as hex), at most MAX_TLV_VALUE long."""
    fields: dict[str, Any] = {}
    records = _tlv_records(data)
    if records is None:
        return Invalid("v2 TLVs malformed or too many")
    for kind, value in records:
        if kind in FIELD_OF_TLV:
            fields[FIELD_OF_TLV[kind]] = _text(value)
        elif kind == PP2_TYPE_AWS and value[:1] == bytes([PP2_SUBTYPE_AWS_VPCE_ID]):
            fields["pp_aws_vpce_id"] = _text(value[1:])
        elif kind == PP2_TYPE_SSL and len(value) >= 5:
            fields["pp_ssl"] = bool(value[0] & PP2_CLIENT_SSL)
            for sub, sub_value in _tlv_records(value[5:]) or ():
                if sub == PP2_SUBTYPE_SSL_VERSION:
                    fields["pp_ssl_version"] = _text(sub_value)
                elif sub == PP2_SUBTYPE_SSL_CN:
                    fields["pp_ssl_cn"] = _text(sub_value)
    return fields


def _tlv_records(data: bytes) -> list[tuple[int, bytes]] | None:
    records: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if offset + 3 > len(data) or len(records) == MAX_TLVS:
            return None
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        end = offset + 3 + length
        if end > len(data):
            return None
        records.append((data[offset], data[offset + 3 : end]))
        offset = end
    return records


def _text(value: bytes) -> str:
    value = value[:MAX_TLV_VALUE]
    if all(0x20 < byte < 0x7F for byte in value):
        return value.decode("ascii")
    return value.hex()


def v1_header(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """A v1 header line, for PROXY protocol out."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_UNIQUE_ID = 0x05
MAX_TLV_VALUE = 255  # what we send: a name, a protocol, an id (UNIQUE_ID allows 128 at most)


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value record of a v2 header."""
    value = value[:MAX_TLV_VALUE]
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def v2_header(
    source: str, source_port: int, destination: str, destination_port: int, tlvs: bytes = b""
) -> bytes:
    """A v2 header, for PROXY protocol out; `tlvs`: encoded TLV records to carry."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x21 if src.version == 6 else 0x11
    body = (
        src.packed
        + dst.packed
        + source_port.to_bytes(2, "big")
        + destination_port.to_bytes(2, "big")
        + tlvs
    )
    return V2_SIGNATURE + bytes([0x21, family]) + len(body).to_bytes(2, "big") + body


def unknown_header(version: str) -> bytes:
    """A header that says the addresses are not known (mixed address families)."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    return V2_SIGNATURE + b"\x21\x00\x00\x00"
