"""Captures the first flight a real client sends: `python capture.py NAME -- CLIENT ARGS...`.

Listens on a free loopback port, runs the client with `{port}` replaced by that port, stores
what the client sent before 1 s of silence (at most 64 KiB) as NAME, and closes. See README.md.
"""

import socket
import subprocess
import sys
import threading


def capture(name, command):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray()

    def serve():
        connection, _ = server.accept()
        connection.settimeout(1.0)
        try:
            while len(received) < 65536:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)
        except socket.timeout:
            pass
        connection.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client = subprocess.Popen([arg.replace("{port}", str(port)) for arg in command],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    thread.join(10)
    client.kill()
    client.wait()
    server.close()
    with open(name, "wb") as out:
        out.write(received)
    print(f"{name}: {len(received)} bytes")


if __name__ == "__main__":
    separator = sys.argv.index("--")
    capture(sys.argv[1], sys.argv[separator + 1:])
