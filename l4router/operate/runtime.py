"""Where an operator's change to a backend server goes: this process's backend groups, or,
under a supervisor, every worker's.

The process that reads the config (a single router, or the supervisor) checks a change,
records it in the runtime state (l4router.backends.control), logs and counts it; then it is
made to the running groups, here or in every worker (through their private admin sockets).
A worker makes what its supervisor forwards and records it in memory only: its supervisor's
file is what it reads again at a reload or a restart.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from l4router.backends.control import Change, ControlError, apply_change
from l4router.operate.worker_status import add_server

log = Logger()


class RouterControl:
    """Changes made to this process's groups (a single router, or a worker)."""

    def __init__(self, router, state, metrics=None):
        """`metrics`: ConfigMetrics where the change is accepted (None in a worker)."""
        self.router = router
        self.state = state
        self.metrics = metrics

    def change(self, change: Change) -> defer.Deferred:
        """Fires with the server's status; fails with ControlError."""
        try:
            self.state.check(change, self.router.config.backends)
        except ControlError:
            return defer.fail()
        label = self.state.record(change)
        connections = [c for service in self.router.listeners for c in service.factory.connections]
        status = apply_change(change, self.router.backends.groups, connections)
        if self.metrics is not None:
            _accepted(change, label, self.metrics)
        return defer.succeed(status)


class SupervisorControl:
    """Changes checked and recorded here, then made by every worker."""

    def __init__(self, supervisor, state, metrics, workers):
        """`workers`: l4router.operate.worker_status.WorkerStatus, to reach the workers."""
        self.supervisor = supervisor
        self.state = state
        self.metrics = metrics
        self.workers = workers

    @defer.inlineCallbacks
    def change(self, change: Change):
        self.state.check(change, self.supervisor.config.backends)
        label = self.state.record(change)
        _accepted(change, label, self.metrics)
        token = self.supervisor.config.admin.token  # the workers' sites want it too
        headers = Headers({b"authorization": [f"Bearer {token}".encode()]} if token else {})
        answers = yield self.workers.fetch(change_path(change), b"POST", headers)
        return merge_server_statuses([status for _, status in answers])


def _accepted(change: Change, label: str, metrics) -> None:
    metrics.runtime_changes.labels(change.action).inc()
    details = {
        "weight": f" to {change.weight}",
        "disable": " (relays aborted)" if change.abort else "",
    }.get(change.action, "")
    log.info(
        "Runtime change: backend {backend} server {server}: {action}{details}",
        backend=change.backend,
        server=label,
        action=change.action,
        details=details,
    )


def change_path(change: Change) -> bytes:
    """The admin-site request that makes `change` (what a worker is sent)."""
    query: dict[str, object] = {}
    if change.weight is not None:
        query["weight"] = change.weight
    if change.backup:
        query["backup"] = 1
    if change.abort:
        query["abort"] = 1
    backend = quote(change.backend, safe="")
    if change.action == "add":
        query["address"] = change.server
        path = f"/backends/{backend}/servers"
    else:
        path = f"/backends/{backend}/servers/{quote(change.server, safe='')}/{change.action}"
    return (path + ("?" + urlencode(query) if query else "")).encode()


def merge_server_statuses(statuses: list[dict]) -> dict:
    """One server as every worker sees it: connections summed, up only if up everywhere."""
    if not statuses:
        raise ControlError("no worker answered", 503)
    merged = dict(statuses[0])
    for other in statuses[1:]:
        add_server(merged, other)
    return merged
