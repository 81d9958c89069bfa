"""A real HTTP/2 cleartext (prior knowledge) server built on the `h2` library, for tests:
it answers every request with `name authority path`."""

import h2.config
import h2.connection
import h2.events


def serve_h2c(backend, connection):
    """A Backend handler (tests.support.Backend): one HTTP/2 connection until the client ends."""
    h2_connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    h2_connection.initiate_connection()
    connection.sendall(h2_connection.data_to_send())
    while True:
        data = connection.recv(65536)
        if not data:
            return
        for event in h2_connection.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                backend.record(headers)
                body = b"%s %s %s" % (
                    backend.name.encode(),
                    headers.get(b":authority", b""),
                    headers.get(b":path", b""),
                )
                h2_connection.send_headers(
                    event.stream_id, [(":status", "200"), ("content-length", str(len(body)))]
                )
                h2_connection.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                connection.sendall(h2_connection.data_to_send())
                return
        connection.sendall(h2_connection.data_to_send())
