"""The admin HTTP site: /metrics for Prometheus, /healthz for liveness, /status/* as JSON."""

import json

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site


class MetricsResource(Resource):
    """Serves the registry the service owns (not prometheus-client's global one)."""

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class HealthResource(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class JSONStatus(Resource):
    """Serves what `describe()` returns, as JSON, fresh on every request."""

    isLeaf = True

    def __init__(self, describe):
        super().__init__()
        self.describe = describe

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.describe(), indent=2).encode() + b"\n"


class RootResource(Resource):
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"l4router admin: /metrics /healthz /status/backends\n"

    def getChild(self, path, request):
        if path == b"":
            return self
        return super().getChild(path, request)


def admin_site(registry, backends_status):
    root = RootResource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", HealthResource())
    status = Resource()
    status.putChild(b"backends", JSONStatus(backends_status))
    root.putChild(b"status", status)
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # requests are not access-logged here
    return site
