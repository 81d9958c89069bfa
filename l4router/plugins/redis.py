"""Redis: the first RESP command."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.redis import parse_command


@implementer(IPlugin, IProtocolDetector)
class RedisDetector(ProtocolDetector):
    name = "redis"
    transports = frozenset({"tcp"})
    priority = 130
    first_bytes = frozenset(b"*")
    fields = ("redis_command",)

    def detect(self, peek):
        return verdict(peek.parsed(parse_command), lambda c: {"redis_command": c.name})


redis = RedisDetector()
