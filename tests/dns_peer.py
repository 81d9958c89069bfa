"""A real DNS server for the tests (dnspython on the wire, a thread on a loopback UDP port)."""

import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DNSServer:
    """Answers A queries for the names in `addresses` (TTL 1 s), SRV queries for `SRV_NAME`
    with the records in `srv`, and, given a `default_address`, every other question with an
    A record of it (TTL 60 s); anything else is NXDOMAIN, and all is SERVFAIL while
    `failing`. Counts the queries and keeps the names asked."""

    SRV_NAME = "_app._tcp.test."

    def __init__(self, default_address=None):
        self.default_address = default_address
        self.addresses = {}  # name with its final dot -> IPv4 address
        self.srv = []  # (priority, weight, port, target)
        self.failing = False
        self.queries = 0
        self.questions = []  # every name asked, in order
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self):
        while True:
            try:
                data, client = self.socket.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            self.queries += 1
            self.socket.sendto(self.answer(query).to_wire(), client)

    def answer(self, query):
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().lower()
        self.questions.append(name)
        if self.failing:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif question.rdtype == dns.rdatatype.SRV and name == self.SRV_NAME:
            response.answer.append(
                dns.rrset.from_text(
                    question.name,
                    1,
                    "IN",
                    "SRV",
                    *[f"{p} {w} {port} {target}" for p, w, port, target in self.srv],
                )
            )
        elif question.rdtype == dns.rdatatype.A and name in self.addresses:
            response.answer.append(
                dns.rrset.from_text(question.name, 1, "IN", "A", self.addresses[name])
            )
        elif self.default_address is not None:
            response.answer.append(
                dns.rrset.from_text(question.name, 60, "IN", "A", self.default_address)
            )
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.socket.close()
