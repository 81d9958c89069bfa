"""JSON-RPC 2.0: in an HTTP/1 POST, newline-delimited over TCP, or LSP-framed (asked before
http1)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import NEED_MORE, NO_MATCH, IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers import INCOMPLETE
from l4router.parsers.http1 import Request
from l4router.parsers.jsonrpc import MAX_BODY, decode_call, parse_raw


def call_fields(call):
    return {
        "jsonrpc_method": call.method,
        "jsonrpc_framing": call.framing,
        "jsonrpc_batch": call.batch,
    }


@implementer(IPlugin, IProtocolDetector)
class JSONRPCDetector(ProtocolDetector):
    name = "jsonrpc"
    transports = frozenset({"tcp"})
    priority = 310
    first_bytes = frozenset(b"P{[ \t\r\nCc")  # POST, raw JSON, Content-Length
    fields = ("jsonrpc_method", "jsonrpc_framing", "jsonrpc_batch", "host", "path")

    def detect(self, peek):
        request = peek.http1_request
        if request is INCOMPLETE:
            return NEED_MORE
        if isinstance(request, Request):
            return self._http(peek, request)
        return verdict(peek.parsed(parse_raw), call_fields)

    @staticmethod
    def _http(peek, request):
        length = request.header("content-length")
        if request.method != "POST" or not (length or "").isdigit() or int(length) > MAX_BODY:
            return NO_MATCH
        body = peek.data[request.head_length : request.head_length + int(length)]
        if len(body) < int(length):
            return NEED_MORE
        return verdict(
            decode_call(body, "http"),
            lambda call: dict(call_fields(call), path=request.path, host=request.host),
        )


jsonrpc = JSONRPCDetector()
