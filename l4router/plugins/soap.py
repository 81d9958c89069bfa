"""SOAP 1.1 and 1.2 over HTTP/1 (asked before http1)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import NEED_MORE, NO_MATCH, IProtocolDetector, Match, ProtocolDetector
from l4router.parsers import INCOMPLETE
from l4router.parsers.http1 import Request
from l4router.parsers.soap import soap_call


@implementer(IPlugin, IProtocolDetector)
class SOAPDetector(ProtocolDetector):
    name = "soap"
    transports = frozenset({"tcp"})
    priority = 300
    first_bytes = frozenset(b"P")  # POST
    fields = ("soap_action", "soap_version", "host", "path", "method")

    def detect(self, peek):
        request = peek.http1_request
        if request is INCOMPLETE:
            return NEED_MORE
        call = soap_call(request) if isinstance(request, Request) else None
        if call is None:
            return NO_MATCH
        fields = {"soap_version": call.version, "path": request.path, "method": request.method}
        if call.action:
            fields["soap_action"] = call.action
        if request.host:
            fields["host"] = request.host
        return Match(fields)


soap = SOAPDetector()
