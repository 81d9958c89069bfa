"""Listening sockets shared by worker processes.

The supervisor binds one SO_REUSEPORT socket per worker for every address (as root, before
privileges drop) and keeps them all; worker N adopts socket N. The kernel spreads new TCP
connections over the sockets and keeps a UDP client's datagrams on one of them (it hashes the
addresses), and a worker that dies and is restarted gets the same socket back: the connections
queued on it meanwhile are accepted by the new worker, not reset.
"""

import os
import socket

from twisted.logger import Logger

from l4router.connection.stream import listen_stream
from l4router.errors import BindFailed
from l4router.process.steering import attach_source_steering
from l4router.twisted_private import endpoint_address

log = Logger()

MAX_DATAGRAM = 65535  # Twisted reads 8 KiB by default and would cut bigger datagrams


def parse_udp_listen(description):
    """`udp:PORT:interface=HOST` (what config makes of host:port for UDP) -> (host, port)."""
    _, port, *rest = description.split(":", 2)
    host = rest[0].split("=", 1)[1].replace("\\:", ":") if rest else ""
    return host, int(port)


def socket_spec(description):
    """(family, type, host, port, backlog) of a tcp, tcp6 or udp listen description."""
    if description.startswith("udp:"):
        host, port = parse_udp_listen(description)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, socket.SOCK_DGRAM, host, port, 0
    from twisted.internet.endpoints import TCP6ServerEndpoint, serverFromString

    endpoint = serverFromString(None, description)
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
    return (family, socket.SOCK_STREAM, *endpoint_address(endpoint))


def bind_reuseport(description, count, reuse_port=True):
    """`count` listening sockets on one address, or BindFailed with a one-line reason.
    `reuse_port=False` (one process): a second router on the address fails to bind instead
    of sharing its clients."""
    family, kind, host, port, backlog = socket_spec(description)
    if not host:
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind)
            sockets.append(sock)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others share what the first one got
            if kind == socket.SOCK_STREAM:
                sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        # Worded as Twisted words it when there is a single process.
        raise BindFailed(
            f"cannot listen on {description}: Couldn't listen on {host}:{port}: {exc}."
        ) from None
    return sockets


def systemd_socket(description):
    """The socket systemd passed for a `systemd:` description (by `index` or `name`), as
    Twisted's own endpoint finds it (it reads systemd's LISTEN_* once, when imported)."""
    from twisted.internet.endpoints import serverFromString

    try:
        fd = serverFromString(None, description).fileno
    except (KeyError, IndexError, ValueError) as exc:
        raise BindFailed(
            f"cannot listen on {description}: systemd passed no such socket ({exc})"
        ) from None
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)  # systemd passes it blocking; a worker that lost the race to
    return sock  # accept would otherwise block in accept()


def adopt(reactor, description, fd, factory_or_protocol, streams=False, shared=False):
    """Run a listener on a socket the supervisor handed down. The reactor works on a
    duplicate; the original is closed, so that when the port stops listening this worker's
    hold on the socket really ends (the supervisor keeps its own for a successor).

    `streams`: a TCP socket's clients become l4router's own Streams
    (l4router.connection.stream) instead of Twisted's transports; `shared`: every worker
    accepts on this socket (see `shared_by_workers`)."""
    probe = socket.socket(fileno=fd)  # what the socket is, whatever its description
    family, kind = probe.family, probe.type
    probe.detach()
    try:
        if kind == socket.SOCK_DGRAM:
            return reactor.adoptDatagramPort(
                fd, family, factory_or_protocol, maxPacketSize=MAX_DATAGRAM
            )
        if streams and family in (socket.AF_INET, socket.AF_INET6):
            sock = socket.fromfd(fd, family, kind)
            return listen_stream(reactor, sock, factory_or_protocol, shared)
        return reactor.adoptStreamPort(fd, family, factory_or_protocol)
    finally:
        os.close(fd)


def sockets_per_worker(config, held):
    """{description: one socket per worker} for `config`, keeping the sockets `held` already
    for an address and binding what is missing; BindFailed binds nothing.

    A listener steered by source (`needs_steering`) gets a SO_REUSEPORT group, a socket per
    worker. Any other TCP listener gets one socket that every worker accepts on, without
    SO_REUSEPORT (`shared_by_workers`): an idle worker takes the next client, where the
    group's hash would hand it to a worker already behind. (Reloads and upgrades keep what is
    held: a socket per worker from an older version stays a group until a restart.)"""
    sockets, bound = {}, []
    try:
        for listener in config.listeners:
            for description in listener.listen:
                kept = held.get(description, [])
                if description.startswith("systemd:"):  # one socket every worker accepts on
                    passed = kept[:1] or [systemd_socket(description)]
                    sockets[description] = passed * config.workers
                    continue
                held_group = any(_reuses_port(sock) for sock in kept)  # from an older version
                if listener.transport == "tcp" and not needs_steering(listener) and not held_group:
                    shared = kept[:1]
                    if not shared:
                        shared = bind_reuseport(description, 1, reuse_port=False)
                        bound.extend(shared)
                    sockets[description] = shared * config.workers
                    continue
                missing = max(0, config.workers - len(kept))
                more = bind_reuseport(description, missing) if missing else []
                bound.extend(more)
                group = sockets[description] = (kept + more)[: config.workers]
                _steer(description, group, listener)
    except BindFailed:
        for sock in bound:
            sock.close()
        raise
    return sockets


def shared_by_workers(fd):
    """Whether every worker accepts on this listening socket: bound without SO_REUSEPORT by
    a supervisor (an unsteered TCP listener, `sockets_per_worker`) or passed by systemd."""
    probe = socket.socket(fileno=fd)
    try:
        return not _reuses_port(probe)
    finally:
        probe.detach()


def _reuses_port(sock):
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def needs_steering(listener):
    """Per-source limits are exact only if one worker sees all of a source; a UDP client
    that moves to a new port (QUIC, NAT rebinding) must reach the worker holding its session.
    Anything else is one socket every worker accepts on: the next client goes to a worker that
    is free, which also spreads the many connections of one busy source (a load balancer, a
    benchmark) over the workers."""
    return (
        listener.transport == "udp"
        or listener.max_connections_per_source is not None
        or listener.rate_per_source is not None
    )


def _steer(description, group, listener):
    """Every connection of one source to one worker (l4router.process.steering), where the
    listener needs it. A kernel that cannot leaves the spreading to its own hash. (A reload
    that drops the listener's per-source limits leaves the program attached: still exact.)"""
    if not needs_steering(listener):
        return
    try:
        attach_source_steering(group[0], len(group), listener.ipv6_source_prefix)
    except OSError as exc:
        log.warn(
            "Listener {listener} on {address}: connections are not steered by source "
            "({error}); a per-source limit may refuse below its value",
            listener=listener.name,
            address=description,
            error=str(exc),
        )


def close_unused(sockets, kept):
    """Close the sockets of `sockets` that `kept` does not hold too."""
    keep = {id(sock) for per_worker in kept.values() for sock in per_worker}
    for per_worker in sockets.values():
        for sock in per_worker:
            if id(sock) not in keep:
                sock.close()
