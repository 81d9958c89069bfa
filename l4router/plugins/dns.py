"""DNS: the query name and type of the first question (UDP)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.dns import parse_query


@implementer(IPlugin, IProtocolDetector)
class DNSDetector(ProtocolDetector):
    name = "dns"
    transports = frozenset({"udp"})
    priority = 150
    fields = ("qname", "qtype")

    def detect(self, peek):
        return verdict(parse_query(peek.datagrams[0]), lambda q: {"qname": q.name, "qtype": q.type})


dns = DNSDetector()
