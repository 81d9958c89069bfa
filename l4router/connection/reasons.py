"""Every reason a connection (TCP) or a session (UDP) ends or is refused: one list, the words
of the access log's `reason` and of the metrics' `reason` labels.

Members are strings (StrEnum): they are the label values and the log's words as they are."""

from enum import StrEnum


class Reason(StrEnum):
    """Why a connection or session ended or was refused."""

    # Refused at the accept or the first datagram (l4router_connections_rejected_total).
    LIMIT_PROCESS = "limit_process"  # every listener's connections together
    LIMIT_LISTENER = "limit_listener"
    LIMIT_SOURCE = "limit_source"  # per source address (IPv6: per prefix)
    RATE_SOURCE = "rate_source"  # new connections per second per source
    PROXY_PROTOCOL = "proxy_protocol"  # no valid PROXY header where one is required
    PROXY_UNTRUSTED = "proxy_untrusted"  # a PROXY header from a peer not trusted to send one

    # Refused once detected and routed.
    REJECTED = "rejected"  # a route or default said reject
    LIMIT_ROUTE = "limit_route"
    LIMIT_BACKEND = "limit_backend"
    LIMIT_NAME = "limit_name"  # per detected SNI, Host or :authority
    NO_HEALTHY_SERVER = "no_healthy_server"
    BACKEND_FULL = "backend_full"  # every server at max_connections_per_server
    CONNECT_FAILED = "connect_failed"  # every connect attempt failed
    NAME_NOT_ALLOWED = "name_not_allowed"  # server_from: a name outside allow
    NAME_UNRESOLVED = "name_unresolved"  # server_from: a name without an address
    NAME_MISSING = "name_missing"  # server_from: the detected protocol gave no such field

    # Ended.
    COMPLETED = "completed"  # both sides finished sending
    CLIENT_CLOSED_EARLY = "client_closed_early"  # gone before a decision
    CLIENT_CLOSED = "client_closed"
    CLIENT_RESET = "client_reset"
    BACKEND_CLOSED = "backend_closed"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"  # aborted at shutdown_timeout, or a UDP session at shutdown
    SERVER_DISABLED = "server_disabled"  # an operator disabled its server with abort
    BACKEND_UNREACHABLE = "backend_unreachable"  # UDP: the server's host answered ICMP unreachable
    SOCKET_UNAVAILABLE = "socket_unavailable"  # UDP: no socket towards the server (descriptors)
