"""WireGuard: the handshake initiation (UDP)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.wireguard import parse_initiation


@implementer(IPlugin, IProtocolDetector)
class WireGuardDetector(ProtocolDetector):
    name = "wireguard"
    transports = frozenset({"udp"})
    priority = 120
    first_bytes = frozenset({0x01})
    fields = ("wireguard_message",)

    def detect(self, peek):
        return verdict(
            parse_initiation(peek.datagrams[0]), lambda _: {"wireguard_message": "initiation"}
        )


wireguard = WireGuardDetector()
