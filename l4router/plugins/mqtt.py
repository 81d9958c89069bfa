"""MQTT: the CONNECT packet's protocol version, client id and user name."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from l4router.detection import IProtocolDetector, ProtocolDetector
from l4router.detection.verdicts import verdict
from l4router.parsers.mqtt import parse_connect


def connect_fields(connect):
    return {
        "mqtt_version": connect.version,
        "mqtt_client_id": connect.client_id,
        "mqtt_username": connect.username,
    }


@implementer(IPlugin, IProtocolDetector)
class MQTTDetector(ProtocolDetector):
    name = "mqtt"
    transports = frozenset({"tcp"})
    priority = 140
    first_bytes = frozenset({0x10})
    fields = ("mqtt_version", "mqtt_client_id", "mqtt_username")

    def detect(self, peek):
        return verdict(peek.parsed(parse_connect), connect_fields)


mqtt = MQTTDetector()
