"""STUN (WebRTC ICE, TURN): method, class and USERNAME (UDP)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.stun import parse_message


@implementer(IPlugin, IProtocolDetector)
class STUNDetector(ProtocolDetector):
    name = "stun"
    transports = frozenset({"udp"})
    priority = 130
    first_bytes = frozenset(range(0x40))  # the two first bits are zero
    fields = ("stun_method", "stun_class", "stun_username")

    def detect(self, peek):
        return verdict(
            parse_message(peek.datagrams[0]),
            lambda m: {"stun_method": m.method, "stun_class": m.kind, "stun_username": m.username},
        )


stun = STUNDetector()
