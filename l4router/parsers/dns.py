"""DNS queries (RFC 1035), decoded with twisted.names: the first question's name and type."""

from __future__ import annotations

import attrs
from twisted.names import dns

from l4router.parsers import Invalid

HEADER = 12


@attrs.frozen
class Query:
    name: str  # lower-case, no trailing dot
    type: str  # A, AAAA, MX, ... or TYPE123


def parse_query(datagram: bytes) -> Query | Invalid:
    """A standard query with one question -> Query | Invalid (a datagram is whole: no
    INCOMPLETE)."""
    if len(datagram) < HEADER + 5:
        return Invalid("shorter than a DNS query")
    flags = int.from_bytes(datagram[2:4], "big")
    counts = [int.from_bytes(datagram[i : i + 2], "big") for i in range(4, 12, 2)]
    if flags & 0x8000 or (flags >> 11) & 0x0F != dns.OP_QUERY:
        return Invalid("not a standard query")
    if counts[0] != 1 or counts[1] or counts[2] or counts[3] > 1:
        return Invalid("not one question (and at most an OPT record)")
    message = dns.Message()
    try:
        message.fromStr(datagram)
    except Exception as exc:  # twisted.names raises several types on malformed wire data
        return Invalid(f"malformed DNS message: {type(exc).__name__}")
    if len(message.queries) != 1:  # twisted.names stops quietly at a truncated question
        return Invalid("the question does not parse")
    question = message.queries[0]
    name = question.name.name.decode("ascii", "backslashreplace").rstrip(".").lower()
    kind = (
        dns.QUERY_TYPES.get(question.type)
        or dns.EXT_QUERIES.get(question.type)
        or f"TYPE{question.type}"
    )
    return Query(name, kind)
