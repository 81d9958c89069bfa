"""Captures the first flight a real client sends: `python capture.py NAME [--h2] -- CLIENT ARGS...`.

Listens on a free loopback port, runs the client with `{port}` replaced by that port, stores
what the client sent before 1 s of silence (at most 64 KiB) as NAME, and closes. With --h2 it
answers an HTTP/2 client preface with an empty SETTINGS frame, as the router does for clients
(grpcio) that wait for the server's SETTINGS before they send HEADERS. See README.md.
"""

import socket
import subprocess
import sys
import threading

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def capture(name, command, answer_h2=False):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray()
    answered = []

    def serve():
        connection, _ = server.accept()
        connection.settimeout(1.0)
        try:
            while len(received) < 65536:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)
                if answer_h2 and received.startswith(H2_PREFACE) and not answered:
                    connection.sendall(EMPTY_SETTINGS)
                    answered.append(True)
        except socket.timeout:
            pass
        connection.close()

    thread = threading.Thread(daemon=True, target=serve)
    thread.start()
    client = subprocess.Popen(
        [arg.replace("{port}", str(port)) for arg in command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    thread.join(10)
    client.kill()
    client.wait()
    server.close()
    with open(name, "wb") as out:
        out.write(received)
    print(f"{name}: {len(received)} bytes")


if __name__ == "__main__":
    separator = sys.argv.index("--")
    capture(sys.argv[1], sys.argv[separator + 1 :], answer_h2="--h2" in sys.argv[2:separator])
