"""XMPP: the stream header's `to` domain and namespace (client-to-server or server-to-server)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.xmpp import parse_stream_header


@implementer(IPlugin, IProtocolDetector)
class XMPPDetector(ProtocolDetector):
    name = "xmpp"
    transports = frozenset({"tcp"})
    priority = 180
    first_bytes = frozenset(b"< \t\r\n\x0b\x0c")  # the header may follow white space
    fields = ("xmpp_to", "xmpp_namespace")

    def detect(self, peek):
        return verdict(
            peek.parsed(parse_stream_header),
            lambda h: {"xmpp_to": h.to, "xmpp_namespace": h.namespace},
        )


xmpp = XMPPDetector()
