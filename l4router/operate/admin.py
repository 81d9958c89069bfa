"""The admin HTTP site: /metrics, /healthz, /readyz, JSON status, the status page, /reload."""

import hmac
import ipaddress
import json
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.web.pages import errorPage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from l4router.backends.control import Change, ControlError
from l4router.operate import status
from l4router.operate.status_page import render_status_page
from l4router.operate.worker_status import WorkerStatus


class MetricsResource(Resource):
    """Serves the registry the service owns (not prometheus-client's global one).
    `before`: what must happen first (a supervisor has its workers flush their counts)."""

    isLeaf = True

    def __init__(self, registry, before=None):
        super().__init__()
        self.registry = registry
        self.before = before

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        if self.before is None:
            return generate_latest(self.registry)
        return _answer(
            request,
            lambda: defer.maybeDeferred(self.before).addCallback(
                lambda _: generate_latest(self.registry)
            ),
            lambda body: body,
        )


class TextResource(Resource):
    """A plain-text answer computed per request: (HTTP code, text)."""

    isLeaf = True

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def render_GET(self, request):
        code, text = self.answer()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return text.encode() + b"\n"


def _answer(request, compute, render):
    """Write render(compute()) once it is known: a supervisor asks its workers first."""

    def write(value):
        request.write(render(value))
        request.finish()

    def fail(failure):
        request.setResponseCode(500)
        request.write(f"status unavailable: {failure.getErrorMessage()}\n".encode())
        request.finish()

    defer.maybeDeferred(compute).addCallbacks(write, fail)
    return NOT_DONE_YET


class JSONResource(Resource):
    """Serves what `describe()` returns (or fires with), as JSON, fresh on every request."""

    isLeaf = True

    def __init__(self, describe):
        super().__init__()
        self.describe = describe

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return _answer(
            request,
            self.describe,
            lambda value: json.dumps(value, indent=2, default=str).encode() + b"\n",
        )


def _over_unix_socket(request):
    """The request came through a unix: socket: its file permissions chose who may ask, and
    no browser (hence no DNS rebinding, no cross-site request) can reach it."""
    return isinstance(request.getHost(), UNIXAddress)


def cross_site(request):
    """A browser says the request comes from another site (a page driving the admin site)."""
    fetch_site = request.getHeader(b"sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in (b"same-origin", b"none"):
        return True
    origin = request.getHeader(b"origin")
    if origin is None:
        return False
    host = request.getHeader(b"host") or b""
    return origin.lower().split(b"://", 1)[-1] != host.lower()


def state_change_refusal(request, token, what):
    """Why `request` may not change state (`what`: "reload", say), or None. It needs the
    bearer token or a unix: admin socket; no address is exempt (the router's own relays
    arrive from loopback), and a browser's cross-site request never passes."""
    if cross_site(request):
        return "cross-site requests may not change state"
    if token is not None:
        given = request.getHeader(b"authorization") or b""
        if hmac.compare_digest(given, f"Bearer {token}".encode()):
            return None
        return f"{what} needs Authorization: Bearer <admin.token>"
    if _over_unix_socket(request):
        return None
    return f"{what} needs admin.token (or an admin site on a unix: socket)"


def _refuse(request, refusal):
    request.setResponseCode(403)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return refusal.encode() + b"\n"


class ReloadResource(Resource):
    """POST /reload (SIGHUP always reloads)."""

    isLeaf = True

    def __init__(self, reloader, token):
        super().__init__()
        self.reloader = reloader
        self.token = token

    def render_POST(self, request):
        refusal = state_change_refusal(request, self.token, "reload")
        if refusal is not None:
            return _refuse(request, refusal + "; SIGHUP always reloads")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")

        def answer(outcome):
            ok, message = outcome
            request.setResponseCode(200 if ok else 422)
            request.write(message.encode() + b"\n")
            request.finish()

        self.reloader.reload().addCallback(answer)
        return NOT_DONE_YET


class ServerControlResource(Resource):
    """POST /backends/B/servers/S/{drain,disable,enable,weight,remove} and
    POST /backends/B/servers?address=HOST:PORT (add): runtime control of backend servers
    (l4router.operate.runtime). Answers the server's status as JSON."""

    isLeaf = True

    def __init__(self, control, token):
        super().__init__()
        self.control = control
        self.token = token

    def render_POST(self, request):
        refusal = state_change_refusal(request, self.token, "changing a server")
        if refusal is not None:
            return _refuse(request, refusal)
        request.setHeader(b"content-type", b"application/json")
        query = {
            k.decode("latin-1"): [v.decode("utf-8", "replace") for v in values]
            for k, values in request.args.items()
        }
        segments = [unquote(s.decode("latin-1")) for s in request.postpath]
        try:
            change = _change_of(segments, query)
        except ControlError as error:
            return _control_error(request, error)
        done = defer.maybeDeferred(self.control.change, change)

        def answer(server):
            request.write(json.dumps(server, default=str).encode() + b"\n")
            request.finish()

        def failed(failure):
            error = (
                failure.value
                if failure.check(ControlError)
                else ControlError(f"the change failed: {failure.getErrorMessage()}", 500)
            )
            request.write(_control_error(request, error))
            request.finish()

        done.addCallbacks(answer, failed)
        return NOT_DONE_YET


def _change_of(segments, query):
    if len(segments) == 2 and segments[1] == "servers":
        return Change.from_query(segments[0], "add", query.get("address", [""])[0], query)
    if len(segments) == 4 and segments[1] == "servers":
        return Change.from_query(segments[0], segments[3], segments[2], query)
    raise ControlError(
        "use /backends/BACKEND/servers/SERVER/ACTION or "
        "/backends/BACKEND/servers?address=HOST:PORT",
        404,
    )


def _control_error(request, error):
    request.setResponseCode(error.status)
    return json.dumps({"error": str(error)}).encode() + b"\n"


class StatusPage(Resource):
    """The status page: readable in a browser, no JavaScript."""

    isLeaf = True

    def __init__(self, overview):
        super().__init__()
        self.overview = overview

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return _answer(request, self.overview, lambda data: render_status_page(data).encode())


def admin_site(router, reloader, metrics, settings, worker=False):
    """`settings`: AdminSettings (the token, the Host names besides IP literals). A worker's
    site (on a UNIX socket only its supervisor asks) also answers /flush: its pending metric
    updates into the files the supervisor's /metrics reads."""
    throughput = router.throughput
    root = _operations(router, reloader, MetricsResource(metrics.registry), settings.token)
    _status_views(
        root,
        lambda: status.overview(router, throughput),
        router.backends.status,
        lambda: status.connections(router),
    )
    if worker:
        root.putChild(b"flush", JSONResource(lambda: metrics.flush() or {}))
    return AdminSite(root, settings.hosts)


def _status_views(root, overview, backends, connections):
    root.putChild(b"", StatusPage(overview))
    state = JSONResource(overview)
    state.putChild(b"backends", JSONResource(backends))
    state.putChild(b"connections", JSONResource(connections))
    state.isLeaf = False
    root.putChild(b"status", state)


def supervisor_site(supervisor, reloader, settings):
    """The admin site of a supervisor: the workers' metrics summed, its readiness (every
    worker accepting), reloads, and the workers' status merged."""
    workers = WorkerStatus(supervisor.reactor, supervisor)
    metrics = MetricsResource(supervisor.registry, before=lambda: workers.fetch(b"/flush"))
    root = _operations(supervisor, reloader, metrics, settings.token)
    _status_views(root, workers.overview, workers.backends, workers.connections)
    return AdminSite(root, settings.hosts)


def _operations(router, reloader, metrics, token):
    root = Resource()
    root.putChild(b"backends", ServerControlResource(router.control, token))
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", TextResource(lambda: (200, "ok")))
    root.putChild(
        b"readyz", TextResource(lambda: (200, "ready") if router.ready else (503, "not ready"))
    )
    root.putChild(b"reload", ReloadResource(reloader, token))
    return root


def host_allowed(host_header, names):
    """A Host an admin site answers: an IP literal, localhost, or a configured name. Any other
    name may be a DNS-rebinding page reading the status (client addresses, names, paths)."""
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    if host == "localhost" or host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AdminSite(Site):
    """Every answer says nosniff; a request whose Host is not ours is refused."""

    noisy = False
    displayTracebacks = False

    def __init__(self, root, hosts=()):
        super().__init__(root)
        self.hosts = frozenset(hosts)

    def log(self, request):
        """Requests are not access-logged here."""

    def getResourceFor(self, request):
        request.setHeader(b"x-content-type-options", b"nosniff")
        host = request.getHeader(b"host")
        if (
            host is not None
            and not _over_unix_socket(request)
            and not host_allowed(host, self.hosts)
        ):
            return errorPage(
                421,
                "Misdirected Request",
                "This admin site answers to IP addresses, localhost and the names in admin.hosts.",
            )
        return super().getResourceFor(request)
