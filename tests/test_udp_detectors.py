"""UDP parsers and detectors: RFC test vectors, captures, every datagram prefix, fuzzing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4router.detection import NEED_MORE, NO_MATCH, Match, Peek
from l4router.detection.decision import DetectorSet
from l4router.detection.registry import detectors_for, installed_detectors
from l4router.parsers import INCOMPLETE, Invalid, dns, dtls, quic, stun, wireguard
from tests.captures import DATA, capture
from tests.data.capture_udp import read

UDP_DETECTORS = {d.name: d for d in detectors_for(installed_detectors(), "udp")}

UDP_EXPECTED = {
    "quic_aioquic_hello.udp": (
        "quic",
        {"sni": "small.quic.test", "alpn": ("h3",), "quic_version": "1"},
    ),
    "quic_aioquic_big_hello.udp": ("quic", {"sni": "big.quic.test", "quic_version": "1"}),
    "dns_dig_query.udp": ("dns", {"qname": "www.alpha.test", "qtype": "AAAA"}),
    "dtls_openssl_s_client.udp": ("dtls", {"sni": "dtls.example.com", "alpn": ("coap",)}),
    "wireguard_initiation.udp": ("wireguard", {"wireguard_message": "initiation"}),
    "stun_binding_request.udp": (
        "stun",
        {"stun_method": "binding", "stun_class": "request", "stun_username": "evtj:h6vY"},
    ),
}
RFC_VECTORS = {"quic_rfc9001_a2_client_initial.bin": "1", "quic_rfc9369_a2_client_initial.bin": "2"}


def datagrams(name):
    return read(DATA / name)


@pytest.mark.parametrize(
    "version, key, iv, hp",
    [
        (
            quic.VERSION_1,
            "1f369613dd76d5467730efcbe3b1a22d",
            "fa044b2f42a3fd3b46fb255c",
            "9f50449e04a0e810283a1e9933adedd2",
        ),  # RFC 9001 A.1
        (
            quic.VERSION_2,
            "8b1a0bc121284290a29e0971b5cd045d",
            "91f73e2351d8fa91660e909f",
            "45b95e15235d6f45a6b19cbcb0294ba9",
        ),  # RFC 9369 A.1
    ],
)
def test_initial_keys_match_the_rfc_vectors(version, key, iv, hp):
    keys = quic.client_initial_keys(version, bytes.fromhex("8394c8f03e515708"))
    assert (keys.key.hex(), keys.iv.hex(), keys.hp.hex()) == (key, iv, hp)


@pytest.mark.parametrize("name, version", sorted(RFC_VECTORS.items()))
def test_rfc_client_initial_decrypts_to_its_client_hello(name, version):
    packet = capture(name)
    initial = quic.decrypt_initial(packet)
    assert initial.packet_number == 2 and initial.dcid.hex() == "8394c8f03e515708"
    # RFC 9001 A.2: CRYPTO frame at offset 0 of 241 bytes, then PADDING to 1162 bytes.
    assert initial.payload[:4] == bytes.fromhex("060040f1") and len(initial.payload) == 1162
    hello = quic.parse_client_initials([packet])
    assert hello.version == version
    assert (hello.hello.sni, hello.hello.alpn) == ("example.com", ("alpn",))


def test_a_corrupted_initial_does_not_decrypt():
    packet = bytearray(capture("quic_rfc9001_a2_client_initial.bin"))
    packet[100] ^= 1
    assert isinstance(quic.parse_client_initials([bytes(packet)]), Invalid)


def test_crypto_frames_out_of_order_across_datagrams():
    first, second = datagrams("quic_aioquic_big_hello.udp")
    assert quic.parse_client_initials([first]) is INCOMPLETE
    assert quic.parse_client_initials([second]) is INCOMPLETE  # offset 0 is missing
    for order in ([first, second], [second, first]):
        assert quic.parse_client_initials(order).hello.sni == "big.quic.test"


@pytest.mark.parametrize("name", sorted(UDP_EXPECTED))
def test_capture_is_decided_with_its_fields(name):
    protocol, fields = UDP_EXPECTED[name]
    decision = DetectorSet(UDP_DETECTORS.values()).decide(Peek.of_datagrams(datagrams(name)))
    assert decision.protocol == protocol
    assert {k: decision.fields.get(k) for k in fields} == fields


@pytest.mark.parametrize("name", sorted(UDP_EXPECTED))
@pytest.mark.parametrize("detector_name", sorted(UDP_DETECTORS))
def test_every_datagram_prefix_and_no_false_match(name, detector_name):
    protocol, _ = UDP_EXPECTED[name]
    detector = UDP_DETECTORS[detector_name]
    flight = datagrams(name)
    whole = detector.detect(Peek.of_datagrams(flight))
    for count in range(1, len(flight) + 1):
        verdict = detector.detect(Peek.of_datagrams(flight[:count]))
        if detector_name == protocol:
            assert verdict is NEED_MORE or verdict == whole
        else:
            assert not isinstance(verdict, Match), (count, verdict)
    if detector_name != protocol:
        assert whole is NO_MATCH


def test_dns_rejects_responses_and_compression_loops():
    query = datagrams("dns_dig_query.udp")[0]
    response = query[:2] + bytes([query[2] | 0x80]) + query[3:]
    assert isinstance(dns.parse_query(response), Invalid)
    # The question name is a pointer to itself: a compression loop.
    loop = query[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert isinstance(dns.parse_query(loop), Invalid)


def test_truncated_question_found_by_fuzzing_is_invalid():
    query = datagrams("dns_dig_query.udp")[0]
    assert isinstance(dns.parse_query(query[:14] + b"\x00\x00\x01" + query[17:]), Invalid)


PARSERS = [
    quic.parse_client_initials,
    dtls.parse_client_hello,
    lambda d: dns.parse_query(d[0]),
    lambda d: stun.parse_message(d[0]),
    lambda d: wireguard.parse_initiation(d[0]),
]


@pytest.mark.parametrize("parser", PARSERS)
@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=1300), min_size=1, max_size=3))
def test_random_datagrams_never_raise(parser, random_datagrams):
    parser(random_datagrams)


@pytest.mark.parametrize("parser", PARSERS)
@settings(max_examples=300, deadline=None)
@given(
    source=st.sampled_from(sorted(UDP_EXPECTED) + sorted(RFC_VECTORS)),
    position=st.integers(min_value=0),
    patch=st.binary(min_size=1, max_size=4),
)
def test_mutated_datagrams_never_raise(parser, source, position, patch):
    flight = datagrams(source) if source.endswith(".udp") else [capture(source)]
    first = flight[0]
    position %= len(first)
    parser([first[:position] + patch + first[position + len(patch) :]] + flight[1:])


def test_quic_server_connection_ids_find_a_session_by_a_short_header():
    from l4router.connection.quic_paths import ConnectionIds, server_connection_id

    class Session:
        quic_ids = []

    session = Session()
    long_header = bytes([0xC0]) + b"\x00\x00\x00\x01" + b"\x04abcd" + b"\x08SERVERID" + b"..."
    assert server_connection_id(long_header) == b"SERVERID"
    assert server_connection_id(b"\x40SERVERIDxyz") is None  # a short header carries no SCID
    assert server_connection_id(bytes([0xC0]) + b"\x00\x00\x00\x01\x04ab") is None  # cut
    ids = ConnectionIds()
    ids.learn(session, long_header)
    assert ids.find(b"\x41SERVERID" + b"payload") is session
    assert ids.find(b"\x41OTHERIDX" + b"payload") is None
    assert ids.find(bytes([0xC0]) + b"SERVERID") is None  # long headers are detected instead
    ids.forget(session)
    assert ids.find(b"\x41SERVERID" + b"payload") is None


def test_quic_lb_finds_the_server_its_connection_id_names():
    from l4router.connection.quic_paths import QuicLbServers

    class Config:
        quic_lb = type("QuicLb", (), {"config_rotation": 1, "server_id_length": 2})()

    class Server:
        def __init__(self, lb_id, eligible=True):
            self.server = type("S", (), {"quic_lb_id": lb_id})()
            self.eligible = eligible
            self.address = "10.0.0.1"

    class Group:
        config = Config()
        servers = [Server(b"\x0a\x01"), Server(b"\x0a\x02", eligible=False)]

    group = Group()
    index = QuicLbServers({"h3": group})
    rotation_1 = 0b001_00111  # config rotation 1, then the length bits
    assert index.find(bytes([0x41, rotation_1]) + b"\x0a\x01" + b"nonce") == (
        group,
        group.servers[0],
    )
    assert index.find(bytes([0x41, rotation_1]) + b"\x0a\x02nonce") is None  # drained, down
    assert index.find(bytes([0x41, 0b010_00111]) + b"\x0a\x01nonce") is None  # rotation 2
    assert index.find(bytes([0xC1, rotation_1]) + b"\x0a\x01nonce") is None  # long header
