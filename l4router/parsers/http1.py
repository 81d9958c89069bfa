"""HTTP/1.x request head parser (RFC 9112): request line and header fields.

Rejects early: a method must look like one within its first bytes, so binary protocols fall
through to NO_MATCH after a byte or two instead of waiting for a line end.
"""

from __future__ import annotations

import re

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid, first_header

MAX_METHOD = 32
_METHOD_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
_REQUEST_LINE_RE = re.compile(rb"^([A-Z_-]+) ([\x21-\x7e]+) HTTP/1\.([01])\r?$")
_FIELD_NAME_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# The common head, decoded as latin-1 with a line end added: every line a well-formed field
# with no folded continuation and no stray CR. One search in C checks all of it, so its lines
# need no check of their own; anything else goes line by line.
_PLAIN_FIELDS_RE = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r?\n)*")
_CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END_RE = re.compile(rb"\r?\n\r?\n")


@attrs.frozen
class Request:
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value) in order, as str
    head_length: int  # bytes up to and including the blank line

    def header(self, name: str) -> str | None:
        return first_header(self.headers, name)

    @property
    def host(self) -> str | None:
        """Host from the absolute-form target or the Host field: lower-case, port stripped."""
        authority = _authority(self.target)
        if authority is None:
            authority = self.header("host")
        return strip_port(authority) if authority else None

    @property
    def path(self) -> str:
        """The path of the target without the query, normalised (see `normalise_path`);
        '*' for OPTIONS *."""
        target = self.target
        if _authority(target) is not None:
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
        return normalise_path(target.split("?", 1)[0].split("#", 1)[0])


def _authority(target: str) -> str | None:
    lowered = target[:8].lower()
    if lowered.startswith("http://") or lowered.startswith("https://"):
        rest = target.split("://", 1)[1]
        return re.split(r"[/?#]", rest, maxsplit=1)[0].rsplit("@", 1)[-1]
    return None


def strip_port(authority: str) -> str:
    """'Example.COM.:8080' -> 'example.com'; '[::1]:80' -> '::1'. Lower case and without the
    trailing dot of a fully qualified name, so that a rule on a name sees every spelling."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        return authority[1:end] if end > 0 else authority
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return host.rstrip(".")


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalise_path(path: str) -> str:
    """RFC 3986 6.2.2: percent-encoded unreserved characters decoded (`/%72eload` is
    `/reload`), other escapes in upper case, and dot segments removed (`/a/../reload`)."""
    if not path.startswith("/"):  # '*', or CONNECT's host:port
        return path
    if "%" in path:
        path = _PERCENT_RE.sub(_decode_unreserved, path)
    if "/." not in path:
        return path
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    normalised = "/" + "/".join(output)
    if output and path.endswith(("/.", "/..")):
        normalised += "/"
    return normalised


def normalise_authority(authority: str) -> str:
    """Lower case, the host without the trailing dot of a fully qualified name, port kept."""
    authority = authority.strip().lower()
    host, colon, port = (
        authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    )
    return host.rstrip(".") + colon + port


def parse_request(data: bytes) -> Request | Incomplete | Invalid:
    """An HTTP/1 request head -> Request | INCOMPLETE | Invalid."""
    space = data.find(b" ", 0, MAX_METHOD + 1)
    method_end = space if space >= 0 else min(len(data), MAX_METHOD + 1)
    if space == 0 or data[:method_end].translate(None, _METHOD_CHARS):  # a byte left: not A-Z-_
        return Invalid("not an HTTP method")
    if space < 0:
        return INCOMPLETE if len(data) <= MAX_METHOD else Invalid("method too long")
    end = _HEAD_END_RE.search(data)
    if end is None:
        line_end = data.find(b"\n")
        if line_end >= 0 and not _REQUEST_LINE_RE.match(data[:line_end]):
            return Invalid("not an HTTP/1 request line")
        pending = data[:-1] if data.endswith(b"\r") else data  # the CR of a CRLF to come
        if line_end < 0 and _CONTROL_RE.search(pending, space):
            return Invalid("control character in request line")
        return INCOMPLETE
    head = data[: end.start()]
    line_end = head.find(b"\n")
    request_line = _REQUEST_LINE_RE.match(head if line_end < 0 else head[:line_end])
    if request_line is None:
        return Invalid("not an HTTP/1 request line")
    headers = () if line_end < 0 else parse_fields(head[line_end + 1 :])
    if headers is None:
        return Invalid("malformed header field")
    method, target, minor = request_line.groups()
    return Request(
        method.decode("ascii"), target.decode("ascii"), f"1.{minor.decode()}", headers, end.end()
    )


def parse_fields(block: bytes) -> tuple[tuple[str, str], ...] | None:
    """The header fields of a head (the lines after the request line, without the blank
    line) as (lower-case name, value) pairs, or None if a line is not a field."""
    text = block.decode("latin-1")
    if not _PLAIN_FIELDS_RE.fullmatch(text + "\n"):
        return parse_fields_by_line(block)
    fields = []
    for line in text.split("\n"):
        name, _, value = line.partition(":")
        fields.append((name.lower(), value.strip(" \t\r")))  # a CR can only end the line
    return tuple(fields)


def parse_fields_by_line(block: bytes) -> tuple[tuple[str, str], ...] | None:
    """`parse_fields` one line at a time: what also takes folded lines and stray CRs."""
    headers: list[tuple[str, str]] = []
    for line in block.split(b"\n"):
        line = line[:-1] if line.endswith(b"\r") else line
        if line[:1] in (b" ", b"\t") and headers:  # obsolete line folding
            folded, earlier = headers[-1]
            headers[-1] = (folded, f"{earlier} {line.strip().decode('latin-1')}")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME_RE.match(name):
            return None
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return tuple(headers)
