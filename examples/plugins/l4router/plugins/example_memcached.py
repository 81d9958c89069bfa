"""An example third-party detector: the memcached text protocol.

Put this folder on sys.path (PYTHONPATH=examples/plugins) and `twistd l4router --list-detectors`
lists `memcached`; routes can then match `protocol: memcached` and `memcached_command`.
The folder `l4router/plugins/` here has no __init__.py: it extends l4router's plugin package.
"""

import re

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import NEED_MORE, NO_MATCH, IProtocolDetector, Match

COMMANDS = (b"get", b"gets", b"set", b"add", b"replace", b"append", b"prepend", b"cas",
            b"delete", b"incr", b"decr", b"touch", b"stats", b"version", b"flush_all")
_LINE = re.compile(rb"^([a-z_]{1,16})(?: [\x21-\x7e ]{0,300})?\r\n")


@implementer(IPlugin, IProtocolDetector)
class MemcachedDetector:
    name = "memcached"
    transports = frozenset({"tcp"})
    priority = 450  # before http1's general catch, after the binary protocols
    first_bytes = frozenset(c[0] for c in COMMANDS)
    fields = ("memcached_command",)

    def detect(self, peek):
        data = peek.data
        line = _LINE.match(data)
        if line is None:
            word = data.split(b" ", 1)[0].split(b"\r", 1)[0]
            could_be = any(c.startswith(word) for c in COMMANDS) and len(data) < 320
            return NEED_MORE if could_be and b"\n" not in data else NO_MATCH
        command = line.group(1)
        if command not in COMMANDS:
            return NO_MATCH
        return Match({"memcached_command": command.decode("ascii")})


memcached = MemcachedDetector()
