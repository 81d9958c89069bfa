"""Property tests: no parser raises on any input, random or mutated from real captures."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4router.parsers import (
    INCOMPLETE,
    Invalid,
    http1,
    http2,
    jsonrpc,
    mqtt,
    openvpn,
    postgres,
    proxyprotocol,
    rdp,
    redis,
    socks,
    ssh,
    tls,
    xmpp,
)
from tests.captures import capture, capture_names

PARSERS = {
    "tls": tls.parse_client_hello,
    "http1": http1.parse_request,
    "http2": http2.parse_first_request,
    "http2_strip": lambda data: http2.SettingsAckStripper().feed(data),
    "http2_preface": http2.preface_complete,
    "jsonrpc": jsonrpc.parse_raw,
    "mqtt": mqtt.parse_connect,
    "openvpn": openvpn.parse_hard_reset,
    "postgres": postgres.parse_first_message,
    "proxy": proxyprotocol.parse_header,
    "rdp": rdp.parse_connection_request,
    "redis": redis.parse_command,
    "socks": socks.parse_greeting,
    "ssh": ssh.parse_identification,
    "xmpp": xmpp.parse_stream_header,
}
# Prefixes that get random bytes past the first check of each parser.
PREFIXES = [
    b"",
    b"\x16\x03\x01",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/1.1\r\n",
    b"SSH-2.0-",
    b"\x00\x00\x00",
    b"*",
    b"\x10",
    b"\x05",
    b"\x04\x01",
    b"\x03\x00",
    b"<stream:stream",
    b"{",
    b"Content-Length: ",
    b"PROXY TCP4 ",
    proxyprotocol.V2_SIGNATURE + b"\x21\x11",
]


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=400, deadline=None)
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=600))
def test_random_bytes_never_raise(name, prefix, tail):
    result = PARSERS[name](prefix + tail)
    assert result is not None or name == "http2_preface"


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=300, deadline=None)
@given(
    source=st.sampled_from(capture_names()),
    position=st.integers(min_value=0),
    patch=st.binary(min_size=1, max_size=6),
)
def test_mutated_captures_never_raise(name, source, position, patch):
    flight = capture(source)
    position %= len(flight)
    PARSERS[name](flight[:position] + patch + flight[position + len(patch) :])


def test_results_are_typed():
    for name, parser in PARSERS.items():
        if name in ("http2_strip", "http2_preface"):
            continue
        for source in capture_names():
            result = parser(capture(source))
            assert (
                result is INCOMPLETE
                or isinstance(result, Invalid)
                or type(result).__module__.startswith("l4router.parsers")
            )


# The length a parser names for an INCOMPLETE flight is never past a change of its answer: any
# bytes added short of it leave it INCOMPLETE (and for HTTP/2, the SETTINGS offer unchanged).
NEEDED = {
    "tls": (tls.parse_client_hello, tls.client_hello_bytes_needed, lambda data: None),
    "http2": (http2.parse_first_request, http2.frames_bytes_needed, http2.preface_complete),
}
FLIGHTS = {"tls": "tls_curl.bin", "http2": "h2c_curl.bin"}


@pytest.mark.parametrize("name", sorted(NEEDED))
@settings(max_examples=400, deadline=None)
@given(
    cut=st.integers(min_value=0),
    position=st.integers(min_value=0),
    patch=st.binary(max_size=6),
    more=st.binary(max_size=2000),
)
def test_the_length_named_for_an_incomplete_flight_is_never_past_a_change(
    name, cut, position, patch, more
):
    parse, needed_for, offer = NEEDED[name]
    flight = capture(FLIGHTS[name])
    position %= len(flight)
    mutated = flight[:position] + patch + flight[position + len(patch) :]
    data = mutated[: cut % (len(mutated) + 1)]
    if parse(data) is not INCOMPLETE:
        return
    needed = needed_for(data)
    assert needed > len(data)
    longer = (data + more + mutated[len(data) :])[: needed - 1]
    if len(longer) > len(data):
        assert parse(longer) is INCOMPLETE, (len(data), needed)
        assert offer(longer) == offer(data) or not offer(data), (len(data), needed)
