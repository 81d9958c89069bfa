"""The status page's HTML: readable in a browser, no JavaScript, every value escaped."""

import html
import time


def _table(headers, rows):
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _named_row(backend):
    """A backend with no servers of its own: the one its clients name (server_from), or none
    yet (discovery has found none)."""
    named = backend.get("server_from")
    return {
        "server": f"named by the client: {named}" if named else "(none found yet)",
        "address": "",
        "weight": "",
        "healthy": None,
        "state": "",
        "active_connections": backend.get("active_connections", 0),
        "pool_idle": 0,
    }


def render_status_page(data):
    listeners = _table(
        ["listener", "addresses", "active", "accepted", "refused", "bytes/s", "detectors"],
        [
            (
                row["listener"],
                " ".join(row["addresses"]),
                row["active_connections"],
                row["accepted"],
                row["refused"],
                row["bytes_per_second"],
                ", ".join(row["detectors"]),
            )
            for row in data["listeners"]
        ],
    )
    routes = _table(
        ["listener", "route", "backend", "hits"],
        [
            (row["listener"], r["route"], r["backend"], r["hits"])
            for row in data["listeners"]
            for r in row["routes"]
        ],
    )
    servers = _table(
        ["backend", "server", "address", "weight", "health", "state", "active", "idle spares"],
        [
            (
                b["backend"] + (" (backup tier serving)" if b.get("using_backup") else ""),
                s["server"] + (" (backup)" if s.get("backup") else ""),
                s["address"],
                s["weight"],
                {True: "up", False: "DOWN"}.get(s["healthy"], "unknown"),
                s.get("state", "enabled"),
                s["active_connections"],
                s["pool_idle"],
            )
            for b in data["backends"]
            for s in b["servers"] or [_named_row(b)]
        ],
    )
    recent = _table(
        [
            "id",
            "listener",
            "source",
            "protocol",
            "route",
            "server",
            "bytes up",
            "bytes down",
            "seconds",
            "close reason",
        ],
        [
            (
                c["connection_id"],
                c["listener"],
                c["source"],
                c["protocol"],
                c["route"],
                c["server"],
                c["bytes_up"],
                c["bytes_down"],
                f"{c['duration']:.3f}",
                c["reason"],
            )
            for c in data["recent_connections"]
        ],
    )
    state = data.get("state") or ("ready" if data["ready"] else "draining")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>l4router status</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #bbb;padding:.2em .6em;text-align:left}}th{{background:#eee}}</style>
</head><body>
<h1>l4router</h1>
<p>State: <b>{state}</b>. Config: {html.escape(data["config"])}
(sha256 {data["config_sha256"][:12]}). Rendered {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
<h2>Listeners</h2>{listeners}
<h2>Routes</h2>{routes}
<h2>Backends</h2>{servers}
<h2>Recent connections</h2>{recent}
<p>Also: <a href="/metrics">/metrics</a> <a href="/status">/status</a>
<a href="/status/connections">/status/connections</a>
<a href="/status/backends">/status/backends</a></p>
</body></html>
"""
