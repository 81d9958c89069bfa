"""RDP: the X.224 Connection Request, with the mstshash cookie (user name) when sent."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.rdp import parse_connection_request


@implementer(IPlugin, IProtocolDetector)
class RDPDetector(ProtocolDetector):
    name = "rdp"
    transports = frozenset({"tcp"})
    priority = 160
    first_bytes = frozenset({0x03})
    fields = ("rdp_cookie", "rdp_protocols")

    def detect(self, peek):
        return verdict(
            peek.parsed(parse_connection_request),
            lambda r: {"rdp_cookie": r.cookie, "rdp_protocols": r.protocols},
        )


rdp = RDPDetector()
