"""Captures a UDP client's first datagrams: `python capture_udp.py NAME -- CLIENT ARGS...`.

Stores what arrives within 1 s as NAME: each datagram as a 2-byte big-endian length and its
bytes. `{port}` in the client's arguments is replaced by the port listened on.
"""

import socket
import subprocess
import sys


def capture(name, command):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(1.0)
    port = server.getsockname()[1]
    client = subprocess.Popen(
        [a.replace("{port}", str(port)) for a in command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    datagrams = []
    try:
        while len(datagrams) < 16:
            datagrams.append(server.recvfrom(65536)[0])
    except socket.timeout:
        pass
    client.kill()
    client.wait()
    with open(name, "wb") as out:
        for datagram in datagrams:
            out.write(len(datagram).to_bytes(2, "big") + datagram)
    print(f"{name}: {len(datagrams)} datagrams, {[len(d) for d in datagrams]}")


def read(path):
    data = open(path, "rb").read()
    datagrams = []
    while data:
        size = int.from_bytes(data[:2], "big")
        datagrams.append(data[2 : 2 + size])
        data = data[2 + size :]
    return datagrams


if __name__ == "__main__":
    capture(sys.argv[1], sys.argv[sys.argv.index("--") + 1 :])
