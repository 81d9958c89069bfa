"""HTTP/2 with prior knowledge (RFC 9113): the client preface, then frames up to the first
complete HEADERS block, decoded with the `hpack` library.

SETTINGS, WINDOW_UPDATE, PRIORITY and PING may come before the HEADERS; CONTINUATION frames
may follow it. The decoded header list is bounded, so an HPACK bomb is Invalid, not memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import hpack
from hpack.exceptions import HPACKError

from l4router.parsers import INCOMPLETE, Incomplete, Invalid, first_header
from l4router.parsers.http1 import normalise_authority, normalise_path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE before the peer has raised it
MAX_HEADER_LIST = 65536
FRAME_HEADERS, FRAME_PRIORITY, FRAME_SETTINGS = 0x1, 0x2, 0x4
FRAME_PING, FRAME_WINDOW_UPDATE, FRAME_CONTINUATION = 0x6, 0x8, 0x9
FLAG_ACK, FLAG_END_HEADERS, FLAG_PADDED, FLAG_PRIORITY = 0x1, 0x4, 0x8, 0x20
BEFORE_HEADERS = frozenset({FRAME_SETTINGS, FRAME_WINDOW_UPDATE, FRAME_PRIORITY, FRAME_PING})
# Real clients send a handful of frames up to the end of their first header block (SETTINGS,
# WINDOW_UPDATE, a few PRIORITY, HEADERS, rarely a CONTINUATION). More is a client making the
# router walk the same frames once per segment: it is not a request we route.
MAX_FIRST_FRAMES = 16

# What a server sends first: an empty SETTINGS frame (changes no setting).
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


@attrs.frozen
class Request:
    headers: tuple[tuple[str, str], ...]  # (name, value) pairs as str, pseudo-headers included

    def header(self, name: str) -> str | None:
        return first_header(self.headers, name)

    @property
    def authority(self) -> str | None:
        value = self.header(":authority") or self.header("host")
        return normalise_authority(value) if value else None

    @property
    def path(self) -> str | None:
        """:path with its path part normalised as HTTP/1's is; the query kept."""
        value = self.header(":path")
        if value is None:
            return None
        path, question, query = value.partition("?")
        return normalise_path(path) + question + query


def _frames(data: bytes, start: int = len(PREFACE)) -> Iterator[tuple[int, int, int, int, bytes]]:
    """(offset, type, flags, stream id, payload) of each complete frame; stops at a partial one."""
    pos = start
    while len(data) - pos >= FRAME_HEADER:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if length > MAX_FRAME:
            raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        end = pos + FRAME_HEADER + length
        if end > len(data):
            return
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        yield pos, data[pos + 3], data[pos + 4], stream, data[pos + FRAME_HEADER : end]
        pos = end


def frames_bytes_needed(data: bytes) -> int:
    """For a flight parse_first_request calls INCOMPLETE: the length it must reach before the
    answer can change. Within the preface, one byte more (a byte off it is answered at once);
    then the end of the frame under way (frames are looked at whole)."""
    if len(data) < len(PREFACE):
        return len(data) + 1
    pos = len(PREFACE)
    while len(data) - pos >= FRAME_HEADER:
        pos += FRAME_HEADER + int.from_bytes(data[pos : pos + 3], "big")
    return max(pos + FRAME_HEADER if pos <= len(data) else pos, len(data) + 1)


def preface_complete(data: bytes) -> bool:
    """The magic and the client's first SETTINGS frame are all here."""
    if not data.startswith(PREFACE):
        return False
    try:
        return any(True for _ in _frames(data[: len(PREFACE) + FRAME_HEADER + MAX_FRAME]))
    except ValueError:
        return False


def parse_first_request(data: bytes) -> Request | Incomplete | Invalid:
    """The first request's header list -> Request | INCOMPLETE | Invalid."""
    head = data[: len(PREFACE)]
    if head != PREFACE[: len(head)]:
        return Invalid("not the HTTP/2 client preface")
    if len(data) < len(PREFACE):
        return INCOMPLETE
    block: list[bytes] = []
    stream_of_block: int | None = None
    try:
        for index, (offset, kind, flags, stream, payload) in enumerate(_frames(data)):
            if index == MAX_FIRST_FRAMES:
                return Invalid(f"more than {MAX_FIRST_FRAMES} frames before a complete HEADERS")
            if index == 0 and (kind != FRAME_SETTINGS or flags & FLAG_ACK):
                return Invalid("the preface must be followed by SETTINGS")
            if stream_of_block is not None:
                if kind != FRAME_CONTINUATION or stream != stream_of_block:
                    return Invalid("HEADERS not followed by its CONTINUATION")
                block.append(payload)
            elif kind == FRAME_HEADERS:
                if stream == 0 or stream % 2 == 0:
                    return Invalid(f"HEADERS on stream {stream}")
                block.append(_header_block_fragment(flags, payload))
                stream_of_block = stream
            elif kind in BEFORE_HEADERS:
                continue
            else:
                return Invalid(f"frame type {kind} before the first HEADERS")
            if flags & FLAG_END_HEADERS:
                return Request(_decode(b"".join(block)))
    except ValueError as exc:
        return Invalid(str(exc))
    return INCOMPLETE


def _header_block_fragment(flags: int, payload: bytes) -> bytes:
    start, end = 0, len(payload)
    if flags & FLAG_PADDED:
        if not payload:
            raise ValueError("PADDED HEADERS without a pad length")
        start, end = 1, len(payload) - payload[0]
    if flags & FLAG_PRIORITY:
        start += 5
    if start > end:
        raise ValueError("HEADERS padding or priority longer than the frame")
    return payload[start:end]


def _decode(block: bytes) -> tuple[tuple[str, str], ...]:
    decoder = hpack.Decoder()
    decoder.max_header_list_size = MAX_HEADER_LIST
    try:
        headers = decoder.decode(block, raw=True)
    except (HPACKError, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"bad HPACK block: {exc}") from None
    return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in headers)


class SettingsAckStripper:
    """Removes the client's first SETTINGS ACK from its stream, fed in pieces as they come:
    the ACK of the empty SETTINGS the router sent to draw the client out, which the backend
    never sent. (HTTP/2 acknowledges SETTINGS in order, so the first ACK after ours is for
    ours.) Incremental: each byte is looked at once, whatever the segmentation; after
    MAX_SCANNED_FRAMES frames without one it stops looking."""

    MAX_SCANNED_FRAMES = 256

    def __init__(self, start: int = len(PREFACE)) -> None:
        self.skip = start  # bytes to pass on before the next frame header
        self.header = b""  # a frame header split between two pieces
        self.frames = 0
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size and not self.done:
            if self.skip:
                taken = min(self.skip, size - pos)
                out.append(data[pos : pos + taken])
                pos += taken
                self.skip -= taken
                continue
            piece = data[pos : pos + FRAME_HEADER - len(self.header)]
            pos += len(piece)
            self.header += piece
            if len(self.header) < FRAME_HEADER:
                break
            header, self.header = self.header, b""
            length = int.from_bytes(header[:3], "big")
            if header[3] == FRAME_SETTINGS and header[4] & FLAG_ACK and length == 0:
                self.done = True  # the ACK of ours: dropped
                continue
            out.append(header)
            self.skip = length
            self.frames += 1
            self.done = self.frames >= self.MAX_SCANNED_FRAMES
        out.append(data[pos:])
        return b"".join(out)
