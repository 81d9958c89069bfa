"""Real QUIC peers built on aioquic, run as processes by the tests:

    python -m tests.quic_peers serve NAME PORT CERT KEY       an HTTP/3 server answering NAME
    python -m tests.quic_peers get PORT SERVER_NAME CA [--big]  one HTTP/3 GET; prints the body
    python -m tests.quic_peers twice PORT SERVER_NAME CA   two GETs on one connection: prints
        the first body, waits for a line on stdin, prints the second

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
                self.h3.send_headers(h3_event.stream_id, [
                    (b":status", b"200"), (b"content-length", str(len(body)).encode())])
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
        self.h3.send_headers(stream_id, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode()),
            (b":path", path.encode())], end_stream=True)
        self.transmit()
        return await asyncio.wait_for(self.done, 10)


async def run_server(name, port, cert, key):
    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
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
    configuration = QuicConfiguration(is_client=True, alpn_protocols=alpn,
                                      server_name=server_name)
    configuration.load_verify_locations(ca)
    async with connect("127.0.0.1", port, configuration=configuration,
                       create_protocol=H3Client, wait_connected=True) as client:
        body = await client.get(server_name, "/hello")
    sys.stdout.write(body.decode())


async def run_twice(port, server_name, ca):
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                      server_name=server_name)
    configuration.load_verify_locations(ca)
    async with connect("127.0.0.1", port, configuration=configuration,
                       create_protocol=H3Client, wait_connected=True) as client:
        print((await client.get(server_name, "/one")).decode(), flush=True)
        await asyncio.get_event_loop().run_in_executor(None, sys.stdin.readline)
        client.body, client.done = b"", asyncio.get_event_loop().create_future()
        print((await client.get(server_name, "/two")).decode(), flush=True)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "twice":
        asyncio.run(run_twice(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    elif command == "serve":
        asyncio.run(run_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    else:
        asyncio.run(run_get(int(sys.argv[2]), sys.argv[3], sys.argv[4], "--big" in sys.argv))
