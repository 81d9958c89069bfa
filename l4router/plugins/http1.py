"""HTTP/1.x: routes on Host, path and method."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import NEED_MORE, NO_MATCH, IProtocolDetector, Match, ProtocolDetector
from l4router.parsers import INCOMPLETE
from l4router.parsers.http1 import Request


@implementer(IPlugin, IProtocolDetector)
class HTTP1Detector(ProtocolDetector):
    name = "http1"
    transports = frozenset({"tcp"})
    priority = 500  # general: more specific HTTP-based detectors (soap, jsonrpc) go first
    fields = ("method", "path", "host", "http_version", "upgrade", "user_agent")

    def detect(self, peek):
        request = peek.http1_request
        if request is INCOMPLETE:
            return NEED_MORE
        if not isinstance(request, Request):
            return NO_MATCH
        fields = {"method": request.method, "path": request.path, "http_version": request.version}
        upgrade = request.header("upgrade")
        optional = {
            "host": request.host,
            "user_agent": request.header("user-agent"),
            "upgrade": upgrade.split(",")[0].strip().lower() if upgrade else None,
        }
        fields.update((k, v) for k, v in optional.items() if v)
        return Match(fields)


http1 = HTTP1Detector()
