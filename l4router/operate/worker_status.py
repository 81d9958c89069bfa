"""The supervisor's status views: every worker's own, fetched from the admin site it serves on
a private UNIX socket, merged into one (counts summed; a server is up only if every worker
sees it up; connections say which worker holds them)."""

import copy
import json

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, readBody

FETCH_TIMEOUT = 5.0


class _WorkerSocket:
    """An Agent endpoint factory: every request goes to one worker's UNIX socket."""

    def __init__(self, reactor, path):
        self.reactor = reactor
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self.reactor, self.path, timeout=FETCH_TIMEOUT)


class WorkerStatus:
    def __init__(self, reactor, supervisor):
        self.reactor = reactor
        self.supervisor = supervisor

    def fetch(self, path, method=b"GET", headers=None):
        """[(worker index, parsed JSON)] of the workers that answered (200)."""
        requests = []
        for index, worker in sorted(self.supervisor.workers.items()):
            agent = Agent.usingEndpointFactory(
                self.reactor, _WorkerSocket(self.reactor, worker.admin_socket)
            )
            request = agent.request(method, b"http://worker" + path, headers)
            request.addCallback(_body_of_200).addCallback(json.loads)
            request.addTimeout(FETCH_TIMEOUT, self.reactor)
            requests.append(request.addCallback(lambda data, index=index: (index, data)))
        answered = defer.DeferredList(requests, consumeErrors=True)
        return answered.addCallback(lambda results: [value for ok, value in results if ok])

    def connections(self):
        return self.fetch(b"/status/connections").addCallback(_tagged_rows)

    def backends(self):
        return self.fetch(b"/status/backends").addCallback(
            lambda answers: merge_backends([data for _, data in answers])
        )

    def overview(self):
        def merge(answers):
            views = [data for _, data in answers]
            config = self.supervisor.config
            supervisor = self.supervisor
            state = (
                "draining" if supervisor.draining else "ready" if supervisor.ready else "starting"
            )
            return {
                "ready": supervisor.ready,
                "state": state,
                "config": config.source,
                "config_sha256": config.digest,
                "workers": len(views),
                "listeners": merge_listeners([v["listeners"] for v in views])
                or configured_listeners(config),
                "backends": merge_backends([v["backends"] for v in views])
                or configured_backends(config),
                "recent_connections": _tagged_rows(
                    [(index, data["recent_connections"]) for index, data in answers]
                ),
            }

        return self.fetch(b"/status").addCallback(merge)


def _body_of_200(response):
    body = readBody(response)
    if response.code != 200:
        return body.addCallback(
            lambda text: defer.fail(
                ValueError(f"{response.code}: {text[:200].decode('utf-8', 'replace')}")
            )
        )
    return body


def configured_listeners(config):
    """What the config says, before any worker has reported (they are starting)."""
    return [
        {
            "listener": listener.name,
            "addresses": list(listener.listen),
            "active_connections": 0,
            "accepted": 0,
            "refused": 0,
            "bytes_per_second": 0,
            "detectors": list(listener.detect.protocols or ()),
            "routes": [
                {"route": route.label, "backend": route.backend or "reject", "hits": 0}
                for route in listener.routes
            ],
        }
        for listener in config.listeners
    ]


def configured_backends(config):
    return [
        {
            "backend": name,
            "balance": backend.balance,
            "using_backup": False,
            "servers": [
                {
                    "server": server.label,
                    "address": server.host,
                    "weight": server.weight,
                    "backup": server.backup,
                    "healthy": None,
                    "state": "enabled",
                    "active_connections": 0,
                    "pool_idle": 0,
                }
                for server in backend.servers
            ],
        }
        for name, backend in config.backends.items()
    ]


def _tagged_rows(answers):
    return [dict(row, worker=index) for index, rows in answers for row in rows]


SUMMED_LISTENER_FIELDS = ("active_connections", "accepted", "refused", "bytes_per_second")


def merge_listeners(per_worker):
    return _merged(per_worker, "listener", _add_listener)


def merge_backends(per_worker):
    return _merged(per_worker, "backend", _add_backend)


def _merged(per_worker, key, add):
    """The workers' rows, one per `key`: the first worker's copied, the others' added to it."""
    merged = {}
    for rows in per_worker:
        for row in rows:
            into = merged.get(row[key])
            if into is None:
                merged[row[key]] = copy.deepcopy(row)
            else:
                add(into, row)
    return list(merged.values())


def _add_listener(into, listener):
    for field in SUMMED_LISTENER_FIELDS:
        into[field] += listener[field]
    hits = {route["route"]: route["hits"] for route in listener["routes"]}
    for route in into["routes"]:
        route["hits"] += hits.get(route["route"], 0)


def _add_backend(into, backend):
    into["using_backup"] = into.get("using_backup", False) or backend.get("using_backup", False)
    servers = {server["server"]: server for server in backend["servers"]}
    for server in into["servers"]:
        other = servers.get(server["server"])
        if other is not None:
            add_server(server, other)


def add_server(into, other):
    """One server as two workers see it: connections summed, up only if up in both."""
    into["healthy"] = into["healthy"] and other["healthy"]
    into["active_connections"] += other["active_connections"]
    into["pool_idle"] += other["pool_idle"]
