"""PostgreSQL's first message (protocol 3.0): SSLRequest, GSSENCRequest, CancelRequest or the
StartupMessage with its parameters (user, database, application_name, ...)."""

import attrs

from l4router.parsers import INCOMPLETE, Incomplete, Invalid

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 3 << 16
MAX_STARTUP = 10000  # the server's own limit
REQUEST_CODES = {SSL_REQUEST: "ssl", GSSENC_REQUEST: "gssenc", CANCEL_REQUEST: "cancel"}


@attrs.frozen
class FirstMessage:
    kind: str  # startup, ssl, gssenc, cancel
    parameters: tuple[tuple[str, str], ...] = ()  # (name, value) of a StartupMessage

    def parameter(self, name: str) -> str | None:
        return dict(self.parameters).get(name)


def parse_first_message(data: bytes) -> FirstMessage | Incomplete | Invalid:
    if len(data) >= 1 and data[0] != 0:
        return Invalid("length too large for a first message")
    if len(data) < 8:
        return INCOMPLETE
    length = int.from_bytes(data[:4], "big")
    code = int.from_bytes(data[4:8], "big")
    if code in REQUEST_CODES:
        expected = 16 if code == CANCEL_REQUEST else 8
        return FirstMessage(REQUEST_CODES[code]) if length == expected else Invalid("bad length")
    if code >> 16 != 3 or not 9 <= length <= MAX_STARTUP:
        return Invalid("not protocol 3 or a request code")
    if len(data) < length:
        return INCOMPLETE
    body = data[8:length]
    if not body.endswith(b"\x00\x00") and body != b"\x00":
        return Invalid("StartupMessage not terminated")
    fields = body[:-1].split(b"\x00")[:-1]
    if len(fields) % 2:
        return Invalid("StartupMessage parameters not in pairs")
    pairs = tuple(
        (fields[i].decode("utf-8", "replace"), fields[i + 1].decode("utf-8", "replace"))
        for i in range(0, len(fields), 2)
    )
    return FirstMessage("startup", pairs)
