"""OpenVPN over TCP or UDP: the client's hard-reset packet."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.openvpn import parse_hard_reset, parse_udp_hard_reset


@implementer(IPlugin, IProtocolDetector)
class OpenVPNDetector(ProtocolDetector):
    name = "openvpn"
    transports = frozenset({"tcp", "udp"})
    priority = 170
    # TCP: the length's high byte; UDP: the opcode.
    first_bytes = frozenset(range(0x07)) | {0x38, 0x50}
    fields = ("openvpn_reset",)

    def detect(self, peek):
        if peek.transport == "udp":
            parsed = parse_udp_hard_reset(peek.datagrams[0])
        else:
            parsed = peek.parsed(parse_hard_reset)
        return verdict(parsed, lambda r: {"openvpn_reset": r.kind})


openvpn = OpenVPNDetector()
