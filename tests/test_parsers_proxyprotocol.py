"""PROXY protocol v1/v2 headers: both families, LOCAL/UNKNOWN, every split point, malformed."""

import pytest

from l4router.parsers import INCOMPLETE, Invalid
from l4router.parsers.proxyprotocol import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    parse_header,
    tlv,
    v1_header,
    v2_header,
)

CASES = [
    (v1_header("192.0.2.7", 40000, "198.51.100.1", 443), ("192.0.2.7", 40000, "198.51.100.1", 443)),
    (v1_header("2001:db8::7", 1, "2001:db8::1", 80), ("2001:db8::7", 1, "2001:db8::1", 80)),
    (v2_header("192.0.2.7", 40000, "198.51.100.1", 443), ("192.0.2.7", 40000, "198.51.100.1", 443)),
    (v2_header("2001:db8::7", 65535, "2001:db8::1", 80), ("2001:db8::7", 65535, "2001:db8::1", 80)),
]


@pytest.mark.parametrize("header, expected", CASES)
def test_header_parses_and_every_prefix_is_incomplete(header, expected):
    stream = header + b"GET / HTTP/1.1\r\n"
    result = parse_header(stream)
    assert isinstance(result, ProxyHeader)
    assert (
        result.source,
        result.source_port,
        result.destination,
        result.destination_port,
    ) == expected
    assert stream[result.length :] == b"GET / HTTP/1.1\r\n"
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is INCOMPLETE, cut


def test_local_and_unknown_keep_the_peer_address():
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_header(local) == ProxyHeader(2, None, None, None, None, 16)
    assert parse_header(b"PROXY UNKNOWN\r\n").source is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY " + b"x" * 200,
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x21\x11\xff\xff",
        V2_SIGNATURE + b"\x21\x31\x00\x00",
    ],
)
def test_malformed_is_invalid(data):
    assert isinstance(parse_header(data), Invalid)


def _v2_with_tlvs(tlvs):
    return v2_header("192.0.2.1", 1234, "192.0.2.2", 443, tlvs)


def test_v2_tlvs_become_fields_and_malformed_ones_are_invalid():
    aws = tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")
    ssl = tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example"))
    header = _v2_with_tlvs(
        tlv(PP2_TYPE_AUTHORITY, b"svc.example")
        + tlv(PP2_TYPE_ALPN, b"h2")
        + tlv(PP2_TYPE_UNIQUE_ID, b"\x00\x01\xfe")
        + tlv(0x04, b"")
        + aws
        + ssl
    )
    parsed = parse_header(header + b"rest")
    assert parsed.length == len(header)
    assert parsed.fields == {
        "pp_authority": "svc.example",
        "pp_alpn": "h2",
        "pp_unique_id": "0001fe",
        "pp_aws_vpce_id": "vpce-08d2bf15fac5001c9",
        "pp_ssl": True,
        "pp_ssl_version": "TLSv1.3",
        "pp_ssl_cn": "client.example",
    }
    overrun = _v2_with_tlvs(b"\x02\x00\x09short")
    assert isinstance(parse_header(overrun), Invalid)
    too_many = _v2_with_tlvs(tlv(0x04, b"") * 17)
    assert isinstance(parse_header(too_many), Invalid)
    assert parse_header(_v2_with_tlvs(tlv(0x04, b"") * 16)).fields == {}
