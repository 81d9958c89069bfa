"""HTTP/2 with prior knowledge: `grpc` (asked first) and `h2c`.

grpcio sends its preface and SETTINGS and then waits for the server's SETTINGS before any
HEADERS. Both detectors therefore draw the HEADERS out: once the preface is complete and the
client has gone quiet without HEADERS, the router sends an empty SETTINGS frame. The decision
comes with the HEADERS, and the client's ACK of those SETTINGS, before or after it, is removed
from what reaches the backend (`rewriter`), so the backend sees an ordinary connection.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import NEED_MORE, IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers import INCOMPLETE
from l4router.parsers.http2 import (
    EMPTY_SETTINGS,
    SettingsAckStripper,
    frames_bytes_needed,
    preface_complete,
)
from l4router.parsers.soap import media_type

H2_FIELDS = ("authority", "path", "method", "scheme", "content_type")


def h2_fields(request):
    return {
        "authority": request.authority,
        "path": request.path,
        "method": request.header(":method"),
        "scheme": request.header(":scheme"),
        "content_type": request.header("content-type"),
    }


def is_grpc(request):
    kind = media_type(request.header("content-type"))
    return kind == "application/grpc" or kind.startswith("application/grpc+")


def grpc_fields(request):
    fields = h2_fields(request)
    service, _, method = (request.header(":path") or "").lstrip("/").partition("/")
    fields.update(grpc_service=service or None, grpc_method=method or None)
    return fields


class HTTP2Detector(ProtocolDetector):
    """What grpc and h2c share: the parse, the elicitation and the replay rewrite."""

    transports = frozenset({"tcp"})
    first_bytes = frozenset(b"P")  # the preface

    def request(self, peek):
        return peek.h2_first_headers

    def bytes_needed(self, peek):
        return frames_bytes_needed(peek.data)

    def elicit(self, peek):
        if peek.h2_first_headers is INCOMPLETE and preface_complete(peek.data):
            return EMPTY_SETTINGS
        return None

    def rewriter(self):
        """Removes the client's ACK of the elicited SETTINGS from its stream."""
        return SettingsAckStripper()


@implementer(IPlugin, IProtocolDetector)
class GRPCDetector(HTTP2Detector):
    name = "grpc"
    priority = 200
    fields = H2_FIELDS + ("grpc_service", "grpc_method")

    def detect(self, peek):
        request = self.request(peek)
        if request is INCOMPLETE:
            return NEED_MORE
        return verdict(request, grpc_fields, accept=is_grpc)


@implementer(IPlugin, IProtocolDetector)
class H2CDetector(HTTP2Detector):
    name = "h2c"
    priority = 210
    fields = H2_FIELDS

    def detect(self, peek):
        return verdict(self.request(peek), h2_fields)


grpc = GRPCDetector()
h2c = H2CDetector()
