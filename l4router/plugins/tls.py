"""TLS: routes on SNI and ALPN without terminating TLS."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import NEED_MORE, NO_MATCH, IProtocolDetector, Match, ProtocolDetector
from l4router.parsers import INCOMPLETE
from l4router.parsers.tls import (
    ClientHello,
    client_hello_bytes_needed,
    parse_truncated_client_hello,
    version_name,
)


@implementer(IPlugin, IProtocolDetector)
class TLSDetector(ProtocolDetector):
    name = "tls"
    transports = frozenset({"tcp"})
    priority = 100
    first_bytes = frozenset({0x16})
    fields = ("sni", "alpn", "tls_version", "tls_versions", "ech", "truncated")

    def detect(self, peek):
        hello = peek.tls_client_hello
        if hello is INCOMPLETE:
            return NEED_MORE
        if not isinstance(hello, ClientHello):
            return NO_MATCH
        return Match(hello_fields(hello))

    def bytes_needed(self, peek):
        return client_hello_bytes_needed(peek.data)

    def detect_truncated(self, peek):
        """A ClientHello longer than detect.max_bytes (or cut by the client) is TLS all the
        same: decided with what was parsed before the cut, `truncated: true`."""
        hello = parse_truncated_client_hello(peek.data)
        if hello is None:
            return NO_MATCH
        return Match(dict(hello_fields(hello), truncated=True))


def hello_fields(hello):
    fields = {
        "alpn": hello.alpn,
        "tls_version": hello.version,
        "tls_versions": tuple(version_name(v) for v in hello.versions),
        "ech": hello.ech,
    }
    if hello.sni is not None:
        fields["sni"] = hello.sni
    return fields


tls = TLSDetector()
