"""DTLS: SNI and ALPN from the ClientHello (UDP)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.dtls import parse_client_hello


@implementer(IPlugin, IProtocolDetector)
class DTLSDetector(ProtocolDetector):
    name = "dtls"
    transports = frozenset({"udp"})
    priority = 110
    first_bytes = frozenset({0x16})
    fields = ("sni", "alpn", "dtls_version")

    def detect(self, peek):
        return verdict(
            parse_client_hello(peek.datagrams),
            lambda h: {"sni": h.sni, "alpn": h.alpn, "dtls_version": h.version},
        )


dtls = DTLSDetector()
