"""TLS: routes on SNI and ALPN without terminating TLS."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import NEED_MORE, NO_MATCH, IProtocolDetector, Match
from l4router.parsers import INCOMPLETE
from l4router.parsers.tls import ClientHello, version_name


@implementer(IPlugin, IProtocolDetector)
class TLSDetector:
    name = "tls"
    transports = frozenset({"tcp"})
    priority = 100
    first_bytes = frozenset({0x16})
    fields = ("sni", "alpn", "tls_version", "tls_versions", "ech")

    def detect(self, peek):
        hello = peek.tls_client_hello
        if hello is INCOMPLETE:
            return NEED_MORE
        if not isinstance(hello, ClientHello):
            return NO_MATCH
        fields = {
            "alpn": hello.alpn,
            "tls_version": hello.version,
            "tls_versions": tuple(version_name(v) for v in hello.versions),
            "ech": hello.ech,
        }
        if hello.sni is not None:
            fields["sni"] = hello.sni
        return Match(fields)


tls = TLSDetector()
