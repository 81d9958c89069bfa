"""QUIC v1 and v2: the ClientHello inside the client's Initial packets (UDP)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.quic import parse_client_initials
from l4router.parsers.tls import version_name


def hello_fields(quic):
    hello = quic.hello
    return {
        "sni": hello.sni,
        "alpn": hello.alpn,
        "quic_version": quic.version,
        "tls_versions": tuple(version_name(v) for v in hello.versions),
        "ech": hello.ech,
    }


@implementer(IPlugin, IProtocolDetector)
class QUICDetector(ProtocolDetector):
    name = "quic"
    transports = frozenset({"udp"})
    priority = 100
    first_bytes = frozenset(range(0xC0, 0x100))  # a long header with the fixed bit
    fields = ("sni", "alpn", "quic_version", "tls_versions", "ech")

    def detect(self, peek):
        return verdict(parse_client_initials(peek.datagrams), hello_fields)


quic = QUICDetector()
