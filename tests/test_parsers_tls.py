"""The TLS ClientHello parser on real captures: whole, at every split point, re-framed, fuzzed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4router.parsers import INCOMPLETE, Invalid
from l4router.parsers.tls import ClientHello, is_grease, parse_client_hello
from tests.captures import EXPECTED, capture

TLS_CAPTURES = [name for name, (protocol, _) in EXPECTED.items() if protocol == "tls"]


def split_into_records(flight, *sizes):
    """Re-frame the handshake of a one-record ClientHello into records of the given sizes."""
    assert flight[0] == 22
    body = flight[5:]
    records = []
    for size in list(sizes) + [len(body)]:
        chunk, body = body[:size], body[size:]
        if chunk:
            records.append(flight[:3] + len(chunk).to_bytes(2, "big") + chunk)
    return b"".join(records)


@pytest.mark.parametrize("name", TLS_CAPTURES)
def test_capture_parses_to_expected_fields(name):
    hello = parse_client_hello(capture(name))
    assert isinstance(hello, ClientHello)
    expected = EXPECTED[name][1]
    assert hello.sni == expected.get("sni")
    assert hello.alpn == expected["alpn"] if "alpn" in expected else True
    if "tls_version" in expected:
        assert hello.version == expected["tls_version"]


@pytest.mark.parametrize("name", TLS_CAPTURES)
def test_every_prefix_is_incomplete(name):
    flight = capture(name)
    for cut in range(len(flight)):
        assert parse_client_hello(flight[:cut]) is INCOMPLETE, cut


@pytest.mark.parametrize("name", TLS_CAPTURES)
def test_split_over_several_records(name):
    flight = capture(name)
    whole = parse_client_hello(flight)
    for sizes in [(1,), (3,), (4,), (40,), (100, 1, 50), (len(flight) - 6,)]:
        reframed = split_into_records(flight, *sizes)
        assert parse_client_hello(reframed) == whole, sizes
        for cut in range(len(reframed)):
            assert parse_client_hello(reframed[:cut]) is INCOMPLETE


def test_trailing_bytes_after_the_hello_are_ignored():
    flight = capture("tls_curl.bin")
    assert parse_client_hello(flight + b"\x14\x03\x03\x00\x01\x01").sni == "www.example.com"


@pytest.mark.parametrize(
    "flight, reason",
    [
        (b"\x17\x03\x03\x00\x10", "record type"),
        (b"\x16\x02", "record version"),
        (b"\x16\x03\x09", "record version"),
        (b"\x16\x03\x01\x00\x00", "record length"),
        (b"\x16\x03\x01\xff\xff", "record length"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not ClientHello"),
        (b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00", "malformed"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "out of range"),
    ],
)
def test_malformed_is_invalid_with_a_reason(flight, reason):
    result = parse_client_hello(flight)
    assert isinstance(result, Invalid)
    assert reason in result.reason


def test_lengths_that_overrun_their_block_are_invalid():
    flight = bytearray(capture("tls_openssl_s_client.bin"))
    # The extensions block length is the last 2-byte length before the first extension; blow
    # up every length byte in turn and check the parser never raises nor misreads silently.
    for index in range(9, len(flight)):
        mutated = bytes(flight[:index]) + b"\xff" + bytes(flight[index + 1 :])
        result = parse_client_hello(mutated)
        assert result is INCOMPLETE or isinstance(result, (ClientHello, Invalid))


def test_grease_values():
    assert is_grease(0x0A0A) and is_grease(0xFAFA)
    assert not is_grease(0x0A1A) and not is_grease(0x0304)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=2048))
def test_no_input_raises(data):
    parse_client_hello(data)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(TLS_CAPTURES), st.integers(min_value=0), st.binary(min_size=1, max_size=4))
def test_corrupted_captures_never_raise(name, position, patch):
    flight = capture(name)
    position %= len(flight)
    parse_client_hello(flight[:position] + patch + flight[position + len(patch) :])


def test_browser_hello_with_post_quantum_key_share_and_ech():
    hello = parse_client_hello(capture("tls_chromium_pq.bin"))
    assert len(capture("tls_chromium_pq.bin")) > 1900  # more than one typical TCP segment
    assert hello.ech and hello.sni == "www.browser.example"
    assert 0x11EC in _key_share_groups(capture("tls_chromium_pq.bin"))  # X25519MLKEM768


def _key_share_groups(flight):
    """The named groups of the key_share extension, read independently of the parser."""
    body = flight[5 + 4 :]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        kind = int.from_bytes(body[pos : pos + 2], "big")
        length = int.from_bytes(body[pos + 2 : pos + 4], "big")
        if kind == 51:
            shares, groups = body[pos + 6 : pos + 4 + length], []
            while shares:
                groups.append(int.from_bytes(shares[:2], "big"))
                shares = shares[4 + int.from_bytes(shares[2:4], "big") :]
            return groups
        pos += 4 + length
    return []
