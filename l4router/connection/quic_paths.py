"""QUIC that follows its client: a UDP session found by connection ID when the client's
address changes under it (a NAT rebinding).

A QUIC server names its end of a connection with the source connection ID of its long-header
packets (Initial, Handshake); the client then puts that ID at the front of every short-header
packet it sends (RFC 9000 17.3), whatever address it sends from. The router learns those IDs
from the server's replies and, when a short-header packet arrives from an address it has no
session for, looks its destination ID up: a known one moves the session to the new address
(replies follow), instead of the packet being detected afresh (a short header cannot be) and
going to the default route.

A client that migrates on purpose switches to an ID the server issued encrypted
(NEW_CONNECTION_ID), which the router never sees: that is not followed here.
"""

from __future__ import annotations

MAX_IDS_PER_SESSION = 8  # a server's long headers use one; a few more are spare
MAX_ID_LENGTH = 20  # RFC 9000 17.2


def server_connection_id(datagram: bytes) -> bytes | None:
    """The source connection ID of a server's long-header packet, or None."""
    if len(datagram) < 7 or not datagram[0] & 0x80:
        return None
    dcid_length = datagram[5]
    offset = 6 + dcid_length
    if dcid_length > MAX_ID_LENGTH or len(datagram) <= offset:
        return None
    scid_length = datagram[offset]
    scid = datagram[offset + 1 : offset + 1 + scid_length]
    if not 0 < scid_length <= MAX_ID_LENGTH or len(scid) != scid_length:
        return None
    return bytes(scid)


class ConnectionIds:
    """A listener's index of the server connection IDs of its QUIC sessions."""

    def __init__(self):
        self.sessions = {}  # connection id -> session
        self.lengths = set()  # the ID lengths seen: a short header does not say its own

    def learn(self, session, datagram: bytes) -> None:
        """Called with what a QUIC session's server sends."""
        cid = server_connection_id(datagram)
        if cid is None or cid in self.sessions or len(session.quic_ids) >= MAX_IDS_PER_SESSION:
            return
        self.sessions[cid] = session
        self.lengths.add(len(cid))
        session.quic_ids.append(cid)

    def find(self, datagram: bytes):
        """The session a short-header packet from an unknown address belongs to, or None."""
        if not self.sessions or len(datagram) < 2 or datagram[0] & 0xC0 != 0x40:
            return None
        for length in self.lengths:
            session = self.sessions.get(bytes(datagram[1 : 1 + length]))
            if session is not None:
                return session
        return None

    def forget(self, session) -> None:
        for cid in session.quic_ids:
            if self.sessions.get(cid) is session:
                del self.sessions[cid]


class QuicLbServers:
    """The servers of a listener's backends that issue QUIC-LB connection IDs (plaintext), by
    config rotation, ID length and server ID: where a short-header packet whose ID the router
    never saw goes (a client that migrated on purpose to an ID its server issued encrypted)."""

    def __init__(self, groups):
        self.by_rotation = {}  # config rotation -> [(id length, {server id: (group, server)})]
        for group in groups.values():
            settings = group.config.quic_lb
            if settings is None:
                continue
            ids = {server.server.quic_lb_id: (group, server) for server in group.servers}
            self.by_rotation.setdefault(settings.config_rotation, []).append(
                (settings.server_id_length, ids)
            )

    def find(self, datagram: bytes):
        """(group, server) named by a short-header packet's destination ID, or None."""
        if not self.by_rotation or len(datagram) < 3 or datagram[0] & 0xC0 != 0x40:
            return None
        for length, ids in self.by_rotation.get(datagram[1] >> 5, ()):
            found = ids.get(bytes(datagram[2 : 2 + length]))
            if found is not None and found[1].eligible and found[1].address is not None:
                return found
        return None
