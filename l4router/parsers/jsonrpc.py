"""JSON-RPC 2.0 requests: in an HTTP/1 POST body, newline-delimited over raw TCP, or with the
`Content-Length:` framing of the Language Server Protocol."""

from __future__ import annotations

import json
import re

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

MAX_BODY = 1 << 20
_LSP_HEADER = re.compile(rb"^((?:[A-Za-z-]+: [^\r\n]*\r\n){1,8})\r\n")
_CONTENT_LENGTH = re.compile(rb"(?im)^content-length: *([0-9]{1,7})\r$")
_LSP_PREFIX = b"Content-"


@attrs.frozen
class Call:
    method: str | None  # None for a response object
    framing: str  # http, ndjson, content_length
    batch: bool = False


def decode_call(body: bytes, framing: str) -> Call | Invalid:
    """The first JSON-RPC 2.0 object of a complete JSON text -> Call | Invalid."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return Invalid(f"not JSON: {type(exc).__name__}")
    batch = isinstance(document, list)
    first = document[0] if batch and document else document
    if not isinstance(first, dict) or first.get("jsonrpc") != "2.0":
        return Invalid('no "jsonrpc": "2.0" member')
    method = first.get("method")
    if method is not None and not isinstance(method, str):
        return Invalid("method is not a string")
    return Call(method, framing, batch)


def parse_raw(data: bytes) -> Call | Incomplete | Invalid:
    """JSON-RPC over raw TCP, newline-delimited or Content-Length-framed."""
    stripped = data.lstrip(b" \t\r\n")
    if not stripped:
        return INCOMPLETE
    if stripped[:1] in (b"{", b"["):
        end = stripped.find(b"\n")
        if end < 0:
            return INCOMPLETE
        return decode_call(stripped[:end], "ndjson")
    if stripped[: len(_LSP_PREFIX)].lower() != _LSP_PREFIX[: len(stripped)].lower():
        return Invalid("neither JSON nor a Content-Length header")
    header = _LSP_HEADER.match(data)
    if header is None:
        return (
            INCOMPLETE
            if b"\r\n\r\n" not in data[:1024] and len(data) < 1024
            else Invalid("malformed Content-Length header")
        )
    length = _CONTENT_LENGTH.search(header.group(1))
    if length is None or int(length.group(1)) > MAX_BODY:
        return Invalid("no usable Content-Length")
    body = data[header.end() : header.end() + int(length.group(1))]
    if len(body) < int(length.group(1)):
        return INCOMPLETE
    return decode_call(body, "content_length")
