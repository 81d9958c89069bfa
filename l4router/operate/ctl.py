"""`l4router-ctl`: runtime control of a running router's backend servers, over its admin site.

    l4router-ctl servers [BACKEND]
    l4router-ctl drain BACKEND SERVER
    l4router-ctl disable BACKEND SERVER [--abort]
    l4router-ctl enable BACKEND SERVER
    l4router-ctl weight BACKEND SERVER N
    l4router-ctl add BACKEND HOST:PORT [--weight N] [--backup]
    l4router-ctl remove BACKEND SERVER

The admin site is `--admin URL` (default: $L4ROUTER_ADMIN, else http://127.0.0.1:9100); the
token is `--token` or $L4ROUTER_TOKEN. Exit status: 0 done, 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from l4router.backends.control import Change
from l4router.operate.runtime import change_path

DEFAULT_ADMIN = "http://127.0.0.1:9100"
TIMEOUT = 30.0


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="l4router-ctl", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--admin",
        default=os.environ.get("L4ROUTER_ADMIN", DEFAULT_ADMIN),
        help="the admin site's URL",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("L4ROUTER_TOKEN"),
        help="admin.token (default: $L4ROUTER_TOKEN)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("servers", help="every server with its health and state")
    listing.add_argument("backend", nargs="?")
    for name, text in (
        ("drain", "no new clients; relays go on"),
        ("disable", "no new clients (--abort: end its relays too)"),
        ("enable", "clients again"),
        ("remove", "out of the backend"),
        ("weight", "a new weight"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("backend")
        command.add_argument("server", help="as listed: host:port")
        if name == "weight":
            command.add_argument("weight", type=int)
        if name == "disable":
            command.add_argument("--abort", action="store_true")
    add = commands.add_parser("add", help="a new server")
    add.add_argument("backend")
    add.add_argument("address", help="host:port")
    add.add_argument("--weight", type=int)
    add.add_argument("--backup", action="store_true")
    return parser.parse_args(argv)


def request_for(arguments: argparse.Namespace) -> tuple[str, str]:
    """(method, path and query) for a command: the admin site's, as a supervisor forwards it."""
    if arguments.command == "servers":
        return "GET", "/status/backends"
    server = arguments.address if arguments.command == "add" else arguments.server
    change = Change(
        arguments.backend,
        arguments.command,
        server,
        weight=getattr(arguments, "weight", None),
        backup=getattr(arguments, "backup", False),
        abort=getattr(arguments, "abort", False),
    )
    return "POST", change_path(change).decode()


def server_table(backends: list[dict], only: str | None = None) -> str:
    rows = [("BACKEND", "SERVER", "WEIGHT", "HEALTH", "STATE", "ACTIVE")]
    for backend in backends:
        if only is not None and backend["backend"] != only:
            continue
        for server in backend["servers"]:
            health = {True: "up", False: "down"}.get(server["healthy"], "unknown")
            rows.append(
                (
                    backend["backend"],
                    server["server"] + (" (backup)" if server.get("backup") else ""),
                    str(server["weight"]),
                    health,
                    server.get("state", "enabled"),
                    str(server["active_connections"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n"
        for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    method, path = request_for(arguments)
    headers = {"Authorization": f"Bearer {arguments.token}"} if arguments.token else {}
    request = urllib.request.Request(
        arguments.admin.rstrip("/") + path, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace").strip()
        try:
            body = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        sys.stderr.write(f"l4router-ctl: {error.code}: {body}\n")
        return 1
    except (OSError, ValueError) as error:
        sys.stderr.write(f"l4router-ctl: {arguments.admin}: {error}\n")
        return 1
    if arguments.command == "servers":
        sys.stdout.write(server_table(answer, arguments.backend))
    else:
        sys.stdout.write(server_table([{"backend": arguments.backend, "servers": [answer]}]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
