"""SSH: the client's identification string."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.ssh import parse_identification


def ident_fields(ident):
    return {
        "ssh_version": ident.version,
        "ssh_software": ident.software,
        "ssh_banner": ident.banner,
    }


@implementer(IPlugin, IProtocolDetector)
class SSHDetector(ProtocolDetector):
    name = "ssh"
    transports = frozenset({"tcp"})
    priority = 110
    first_bytes = frozenset(b"S")
    fields = ("ssh_version", "ssh_software", "ssh_banner")

    def detect(self, peek):
        return verdict(peek.parsed(parse_identification), ident_fields)


ssh = SSHDetector()
