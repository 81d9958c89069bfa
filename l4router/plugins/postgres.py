"""PostgreSQL: SSLRequest/GSSENCRequest/CancelRequest, or the StartupMessage with user and
database. (PostgreSQL 17's direct TLS is TLS with ALPN `postgresql`: route it with `tls`.)"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.postgres import parse_first_message


def message_fields(message):
    user = message.parameter("user")
    return {
        "pg_request": message.kind,
        "user": user,
        "database": message.parameter("database") or user,  # the server's own default
        "application_name": message.parameter("application_name"),
    }


@implementer(IPlugin, IProtocolDetector)
class PostgresDetector(ProtocolDetector):
    name = "postgres"
    transports = frozenset({"tcp"})
    priority = 120
    first_bytes = frozenset({0x00})
    fields = ("pg_request", "user", "database", "application_name")

    def detect(self, peek):
        return verdict(peek.parsed(parse_first_message), message_fields)


postgres = PostgresDetector()
