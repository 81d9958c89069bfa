"""Real QUIC peers built on aioquic, run as processes by the tests:

    python -m tests.quic_peers serve NAME PORT CERT KEY       an HTTP/3 server answering NAME
    python -m tests.quic_peers get PORT SERVER_NAME CA [--big]  one HTTP/3 GET; prints the body
    python -m tests.quic_peers twice PORT SERVER_NAME CA [--new-cid]   two GETs on one
        connection: prints the first body, waits for a line on stdin (then, with --new-cid,
        moves to a connection ID the server issued), prints the second
    serve ... --quic-lb-id HEX   the server's connection IDs carry HEX as a QUIC-LB server ID

With --big the client offers 30 long ALPN names besides h3, so its ClientHello needs two
Initial packets (two datagrams).
"""

import asyncio
import sys

from aioquic.asyncio import connect, serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated


class H3Server(QuicConnectionProtocol):
    name = b"server"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = None

    def quic_event_received(self, event):
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                path = dict(h3_event.headers).get(b":path", b"")
                body = self.name + b" " + path
                self.h3.send_headers(
                    h3_event.stream_id,
                    [(b":status", b"200"), (b"content-length", str(len(body)).encode())],
                )
                self.h3.send_data(h3_event.stream_id, body, end_stream=True)
                self.transmit()


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.body = b""
        self.done = asyncio.get_event_loop().create_future()

    def quic_event_received(self, event):
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, DataReceived):
                self.body += h3_event.data
                if h3_event.stream_ended and not self.done.done():
                    self.done.set_result(self.body)

    async def get(self, authority, path):
        stream_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        return await asyncio.wait_for(self.done, 10)


QUIC_LB_CID_LENGTH = 10  # no other random draw of aioquic's has this length


def issue_quic_lb_ids(server_id):
    """aioquic draws its connection IDs with os.urandom: those of QUIC_LB_CID_LENGTH get the
    QUIC-LB plaintext form (config rotation 0, the server ID, a random nonce)."""
    import os
    import types

    from aioquic.quic import connection

    def urandom(size):
        if size != QUIC_LB_CID_LENGTH:
            return os.urandom(size)
        return bytes([size - 1]) + server_id + os.urandom(size - 1 - len(server_id))

    connection.os = types.SimpleNamespace(urandom=urandom)


async def run_server(name, port, cert, key, quic_lb_id=None):
    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    if quic_lb_id is not None:
        issue_quic_lb_ids(bytes.fromhex(quic_lb_id))
        configuration.connection_id_length = QUIC_LB_CID_LENGTH
    configuration.load_cert_chain(cert, key)

    class Named(H3Server):
        pass

    Named.name = name.encode()
    await serve("127.0.0.1", port, configuration=configuration, create_protocol=Named)
    print("listening", flush=True)
    await asyncio.Future()


async def run_get(port, server_name, ca, big):
    alpn = list(H3_ALPN)
    if big:
        alpn += [f"x-padding-protocol-{i:03d}-" + "p" * 20 for i in range(30)]
    configuration = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name=server_name)
    configuration.load_verify_locations(ca)
    async with connect(
        "127.0.0.1",
        port,
        configuration=configuration,
        create_protocol=H3Client,
        wait_connected=True,
    ) as client:
        body = await client.get(server_name, "/hello")
    sys.stdout.write(body.decode())


async def run_twice(port, server_name, ca, new_cid=False):
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, server_name=server_name
    )
    configuration.load_verify_locations(ca)
    async with connect(
        "127.0.0.1",
        port,
        configuration=configuration,
        create_protocol=H3Client,
        wait_connected=True,
    ) as client:
        print((await client.get(server_name, "/one")).decode(), flush=True)
        await asyncio.get_event_loop().run_in_executor(None, sys.stdin.readline)
        if new_cid:
            # Once the server has issued a spare ID (NEW_CONNECTION_ID): else aioquic keeps
            # the one it has. A bounded wait; aioquic keeps its spares in a private list.
            for _ in range(100):
                if client._quic._peer_cid_available:
                    break
                await asyncio.sleep(0.05)
            client.change_connection_id()
        client.body, client.done = b"", asyncio.get_event_loop().create_future()
        print((await client.get(server_name, "/two")).decode(), flush=True)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "twice":
        asyncio.run(run_twice(int(sys.argv[2]), sys.argv[3], sys.argv[4], "--new-cid" in sys.argv))
    elif command == "serve":
        lb_id = sys.argv[sys.argv.index("--quic-lb-id") + 1] if "--quic-lb-id" in sys.argv else None
        asyncio.run(run_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], lb_id))
    else:
        asyncio.run(run_get(int(sys.argv[2]), sys.argv[3], sys.argv[4], "--big" in sys.argv))
