"""Redis RESP: the first command, sent as an array of bulk strings (`*3\r\n$3\r\nSET\r\n...`)."""

import re

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

MAX_ARGS = 1024
_NUMBER = re.compile(rb"[0-9]{1,10}\r?$")


@attrs.frozen
class Command:
    name: str  # upper-case
    arguments: int


def parse_command(data: bytes) -> Command | Incomplete | Invalid:
    if data[:1] not in (b"", b"*"):
        return Invalid("not a RESP array")
    head_end = data.find(b"\r\n", 1, 14)
    if head_end < 0:
        return (
            INCOMPLETE
            if len(data) < 14 and _NUMBER.match(data[1:] or b"0")
            else Invalid("bad array length")
        )
    count_text = data[1:head_end]
    if not _NUMBER.match(count_text) or not 1 <= int(count_text) <= MAX_ARGS:
        return Invalid("bad array length")
    pos = head_end + 2
    if len(data) <= pos:
        return INCOMPLETE
    if data[pos : pos + 1] != b"$":
        return Invalid("command name is not a bulk string")
    length_end = data.find(b"\r\n", pos + 1, pos + 14)
    if length_end < 0:
        return INCOMPLETE if len(data) < pos + 14 else Invalid("bad bulk length")
    length_text = data[pos + 1 : length_end]
    if not _NUMBER.match(length_text) or not 1 <= int(length_text) <= 64:
        return Invalid("bad command name length")
    start = length_end + 2
    end = start + int(length_text)
    if len(data) < end + 2:
        return INCOMPLETE
    name = data[start:end]
    if data[end : end + 2] != b"\r\n" or not name.isalpha():
        return Invalid("bad command name")
    return Command(name.decode("ascii").upper(), int(count_text) - 1)
