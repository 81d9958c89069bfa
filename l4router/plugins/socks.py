"""SOCKS 4, 4a and 5 client greetings."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.socks import parse_greeting

METHOD_NAMES = {0: "none", 1: "gssapi", 2: "password"}


def greeting_fields(greeting):
    return {
        "socks_version": greeting.version,
        "socks_methods": tuple(METHOD_NAMES.get(m, str(m)) for m in greeting.methods) or None,
        "socks_host": greeting.host,
        "socks_port": greeting.port,
    }


@implementer(IPlugin, IProtocolDetector)
class SOCKSDetector(ProtocolDetector):
    name = "socks"
    transports = frozenset({"tcp"})
    priority = 150
    first_bytes = frozenset({0x04, 0x05})
    fields = ("socks_version", "socks_methods", "socks_host", "socks_port")

    def detect(self, peek):
        return verdict(peek.parsed(parse_greeting), greeting_fields)


socks = SOCKSDetector()
