"""Makes `twistd l4router` and `twistd --reactor=l4router` exist. Kept lazy: every
`twistd --help` on the machine imports it."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

l4router = ServiceMaker(
    "l4router",
    "l4router.tap",
    "A layer-4 protocol router: peeks at the first bytes, detects the protocol, routes, relays.",
    "l4router",
)

l4router_reactor = Reactor(
    "l4router",
    "l4router.process.reactor",
    "epoll(4) without the per-event logging context (what twistd l4router uses by default).",
)
