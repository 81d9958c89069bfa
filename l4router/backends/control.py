"""Runtime control of backend servers: drain, disable, enable, weight, add, remove.

What an operator changes while the router runs is kept here, by backend and server label,
apart from the groups it applies to: groups are rebuilt by every reload and every worker
(re)start, and each time the same changes are applied again (as HAProxy's server-state file
does across reloads). It is saved to a JSON file when one is given: `state_file` keeps it
across restarts; under a supervisor the workers read the supervisor's copy.
"""

from __future__ import annotations

import json
import os

import attrs
from twisted.logger import Logger

from l4router.config import Server, parse_server, split_host_port
from l4router.connection.reasons import Reason

log = Logger()

ENABLED, DRAINING, DISABLED = "enabled", "draining", "disabled"
STATES = (ENABLED, DRAINING, DISABLED)
ACTIONS = ("drain", "disable", "enable", "weight", "add", "remove")
_STATE_OF_ACTION = {"drain": DRAINING, "disable": DISABLED, "enable": ENABLED}
MAX_WEIGHT = 1000


class ControlError(ValueError):
    """A change that cannot be made; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@attrs.frozen
class Change:
    """One operator request. `server`: a server's label (host:port); for `add`, its address."""

    backend: str
    action: str
    server: str
    weight: int | None = None
    backup: bool = False
    abort: bool = False  # disable: end the server's relays too

    @classmethod
    def from_query(cls, backend: str, action: str, server: str, query: dict) -> Change:
        """From the admin site's path and query arguments ({name: [value, ...]})."""
        if action not in ACTIONS:
            raise ControlError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})", 404)
        weight = None
        if action == "weight" or (action == "add" and "weight" in query):
            raw = query.get("weight", query.get("value", [None]))[0]
            try:
                weight = int(raw)
            except (TypeError, ValueError):
                raise ControlError(f"weight needs an integer 1..{MAX_WEIGHT}, not {raw!r}")
            if not 1 <= weight <= MAX_WEIGHT:
                raise ControlError(f"weight must be 1..{MAX_WEIGHT}, not {weight}")
        return cls(
            backend,
            action,
            server,
            weight,
            backup=_flag(query, "backup"),
            abort=_flag(query, "abort"),
        )


def _flag(query: dict, name: str) -> bool:
    return query.get(name, ["0"])[0].lower() in ("1", "true", "yes")


class RuntimeState:
    """The changes in force: {backend: {label: {"state", "weight"}}} for configured servers,
    servers added at run time, and servers removed."""

    def __init__(self, path: str | None = None, writable: bool = True):
        self.path = path
        self.writable = writable  # a worker reads its supervisor's file, never writes it
        self.servers: dict[str, dict[str, dict]] = {}
        self.added: dict[str, dict[str, dict]] = {}
        self.removed: dict[str, list[str]] = {}
        self.load()

    def load(self) -> None:
        """Read the file again (a worker does at every reload); a missing file is no change,
        a broken one is logged and ignored (the config alone then decides)."""
        if self.path is None or not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as stream:
                saved = json.load(stream)
            self.servers = dict(saved.get("servers", {}))
            self.added = dict(saved.get("added", {}))
            self.removed = {b: list(labels) for b, labels in saved.get("removed", {}).items()}
        except (OSError, ValueError, AttributeError) as exc:
            log.error(
                "The runtime state in {path} cannot be read ({error}): the config alone decides",
                path=self.path,
                error=str(exc),
            )

    def save(self) -> None:
        if self.path is None or not self.writable:
            return
        partial = self.path + ".new"
        with open(partial, "w", encoding="utf-8") as stream:
            json.dump(
                {"servers": self.servers, "added": self.added, "removed": self.removed},
                stream,
                indent=1,
                sort_keys=True,
            )
        os.replace(partial, self.path)

    def servers_of(self, backend) -> dict[str, Server] | None:
        """{label: Server} of a configured backend (`config.Backend`) as changed at run time;
        None when discovery decides them (they are known to the running groups only)."""
        if backend.discovery is not None:
            return None
        servers = {s.label: s for s in backend.servers}
        for label in self.removed.get(backend.name, ()):
            servers.pop(label, None)
        for label, spec in self.added.get(backend.name, {}).items():
            servers[label] = parse_server(spec)
        return servers

    def check(self, change: Change, backends) -> None:
        """Raise ControlError unless `change` can be made to `backends` (name -> config).
        A backend whose servers come from discovery takes changes to any server label (they
        apply to a server of that label whenever discovery gives it), but no add or remove."""
        backend = backends.get(change.backend)
        if backend is None:
            raise ControlError(f"no backend is called {change.backend!r}", 404)
        if backend.server_from is not None:
            raise ControlError(
                f"backend {change.backend} takes its server from the client's "
                "name: it has none to change",
                409,
            )
        servers = self.servers_of(backend)
        if servers is None:
            if change.action in ("add", "remove"):
                raise ControlError(
                    f"backend {change.backend}'s servers come from "
                    f"{backend.discovery.kind} discovery",
                    409,
                )
            return
        if change.action == "add":
            try:
                host, port = split_host_port(change.server)
            except ValueError as exc:
                raise ControlError(f"add needs address=host:port: {exc}") from None
            label = Server(host, port).label
            if label in servers:
                raise ControlError(f"backend {change.backend} has a server {label} already", 409)
        elif change.server not in servers:
            raise ControlError(f"backend {change.backend} has no server {change.server!r}", 404)
        elif change.action == "remove" and len(servers) == 1:
            raise ControlError("a backend keeps at least one server (drain or disable it)", 409)

    def record(self, change: Change) -> str:
        """Keep `change` (checked); the label of the server it concerns."""
        backend, label = change.backend, change.server
        if change.action == "add":
            host, port = split_host_port(change.server)
            label = Server(host, port).label
            removed = self.removed.get(backend, [])
            if label in removed:
                removed.remove(label)
            self.added.setdefault(backend, {})[label] = {
                "address": label,
                "weight": change.weight or 1,
                "backup": change.backup,
            }
        elif change.action == "remove":
            if self.added.get(backend, {}).pop(label, None) is None:
                self.removed.setdefault(backend, []).append(label)
            self.servers.get(backend, {}).pop(label, None)
        else:
            entry = self.servers.setdefault(backend, {}).setdefault(label, {})
            if change.action == "weight":
                entry["weight"] = change.weight
            else:
                entry["state"] = _STATE_OF_ACTION[change.action]
        self.save()
        return label

    def apply(self, groups: dict) -> None:
        """Bring freshly built groups to the state recorded here; servers discovery adds
        later get theirs as they come."""
        for name, group in groups.items():
            for label in self.removed.get(name, ()):
                group.remove_server(label)
            for spec in self.added.get(name, {}).values():
                group.add_server(parse_server(spec))
            for server in group.servers:
                self.apply_to_server(name, server)
            group.on_server_added = lambda server, name=name: self.apply_to_server(name, server)

    def apply_to_server(self, backend: str, server) -> None:
        entry = self.servers.get(backend, {}).get(server.label)
        if entry is None:
            return
        if "weight" in entry:
            server.weight = entry["weight"]
        server.set_admin_state(entry.get("state", ENABLED))

    def forget_missing(self, backends) -> None:
        """After a reload: what concerns backends or servers the config no longer has goes."""
        for name in list(self.servers):
            if name not in backends:
                del self.servers[name]
        for table in (self.added, self.removed):
            for name in list(table):
                if name not in backends:
                    del table[name]
        for name, entries in self.servers.items():
            present = self.servers_of(backends[name])
            for label in [
                label for label in entries if present is not None and label not in present
            ]:
                del entries[label]
        self.save()


def apply_change(change: Change, groups: dict, connections) -> dict:
    """Make `change` (recorded already) to the running groups; abort the relays of a server
    disabled with `abort`. `connections`: every open connection (each has `server`, `abort`).
    The server's status afterwards."""
    group = groups[change.backend]
    if change.action == "add":
        host, port = split_host_port(change.server)
        server = group.add_server(Server(host, port, change.weight or 1, change.backup))
        return server.status()
    if change.action == "remove":
        server = group.remove_server(change.server)
        return dict(server.status(), state="removed")
    server = group.server(change.server)
    if change.action == "weight":
        server.weight = change.weight
    else:
        server.set_admin_state(_STATE_OF_ACTION[change.action])
        if change.action == "disable" and change.abort:
            for connection in [c for c in connections if c.server is server]:
                connection.abort(Reason.SERVER_DISABLED)
    return server.status()
