"""The HTTP/1 request parser on real captures: whole, at every split point, hostile, fuzzed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4router.parsers import INCOMPLETE, Invalid
from l4router.parsers.http1 import (
    _PLAIN_FIELDS_RE,
    Request,
    parse_fields,
    parse_fields_by_line,
    parse_request,
    strip_port,
)
from tests.captures import EXPECTED, capture

HTTP_CAPTURES = [name for name, (protocol, _) in EXPECTED.items() if protocol == "http1"]


@pytest.mark.parametrize("name", HTTP_CAPTURES)
def test_capture_parses_to_expected_fields(name):
    request = parse_request(capture(name))
    assert isinstance(request, Request)
    expected = EXPECTED[name][1]
    parsed = {
        "method": request.method,
        "path": request.path,
        "host": request.host,
        "http_version": request.version,
    }
    assert {k: parsed[k] for k in expected if k in parsed} == {
        k: v for k, v in expected.items() if k in parsed
    }


@pytest.mark.parametrize("name", HTTP_CAPTURES)
def test_every_prefix_is_incomplete(name):
    flight = capture(name)
    head_length = parse_request(flight).head_length
    for cut in range(head_length):
        assert parse_request(flight[:cut]) is INCOMPLETE, cut


@pytest.mark.parametrize(
    "head, host, path",
    [
        (
            b"GET http://Proxy.Example.com:3128/a/b?q HTTP/1.1\r\nHost: other\r\n\r\n",
            "proxy.example.com",
            "/a/b",
        ),
        (b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:8443\r\n\r\n", "2001:db8::1", "/"),
        (b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", "*"),
        (b"GET /x HTTP/1.0\n\n", None, "/x"),
        (b"GET /x HTTP/1.1\r\nX-Long: a\r\n  folded\r\nHost: h\r\n\r\n", "h", "/x"),
    ],
)
def test_host_and_path_forms(head, host, path):
    request = parse_request(head)
    assert request.host == host
    assert request.path == path


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01",
        b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"get / HTTP/1.1\r\n\r\n",
        b" GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /\x00 HTTP/1.1",
        b"A" * 40,
        b"GET / HTTP/3.0\r\n\r\n",
    ],
)
def test_not_http1_is_invalid(data):
    assert isinstance(parse_request(data), Invalid)


def test_strip_port():
    assert strip_port("Example.COM:8080") == "example.com"
    assert strip_port("[::1]:80") == "::1"
    assert strip_port("example.com") == "example.com"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=1024))
def test_no_input_raises(data):
    parse_request(data)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"GET",
                b" ",
                b"/",
                b"HTTP/1.1",
                b"\r\n",
                b":",
                b"Host",
                b"\x00",
                b"\n",
                b"http://",
                b"[",
                b"]",
            ]
        ),
        max_size=30,
    )
)
def test_http_shaped_input_never_raises(parts):
    result = parse_request(b"".join(parts))
    assert result is INCOMPLETE or isinstance(result, (Request, Invalid))


# Field lines: the common ones are read in one pass, the rest line by line; both must agree.
FIELD_BYTES = st.sampled_from(
    [b"a", b"Host", b"X-y", b"1", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\xe9", b"\x00", b"v"]
)


@settings(max_examples=3000)
@given(st.lists(FIELD_BYTES, max_size=40).map(b"".join))
def test_the_one_pass_field_reading_agrees_with_the_line_by_line_one(block):
    assert parse_fields(block) == parse_fields_by_line(block)


def test_a_browsers_fields_take_the_one_pass_and_read_as_line_by_line():
    block = (
        b"Host: www.example.com\r\nUser-Agent: Mozilla/5.0 (X11) \t\r\n"
        b'Accept: text/html,*/*;q=0.8\r\nX-Empty:\r\nsec-ch-ua: "Chromium";v="120"'
    )
    assert _PLAIN_FIELDS_RE.fullmatch(block.decode("latin-1") + "\n")
    assert parse_fields(block) == parse_fields_by_line(block)
    assert parse_fields(block)[1] == ("user-agent", "Mozilla/5.0 (X11)")
    assert parse_fields(block)[3] == ("x-empty", "")
